"""The MRML adapter against real MRML scenes (slicer-core wheel, no mocks).

Geometry is checked against hand computations from :class:`Volume`; segments against the label map voxel
for voxel (exported back through Slicer's own segmentation logic); saved scenes are read back into fresh
scenes, from a folder and from an ``.mrb`` bundle.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")
sitk = pytest.importorskip("SimpleITK")

from BreastDLRLib import mrml  # noqa: E402
from BreastDLRLib.errors import BreastDLRError, InputError  # noqa: E402
from BreastDLRLib.volume import Volume  # noqa: E402

pytestmark = pytest.mark.mrml


# ----------------------------------------------------------------------------------------------- helpers
def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    """Rotation matrix Rz @ Ry @ Rx (degrees), written out by hand."""
    a, b, c = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


OBLIQUE = rotation(20.0, -35.0, 50.0)
SPACING = (0.3, 0.5, 1.7)  # anisotropic (i, j, k)
ORIGIN = (10.0, -20.0, 30.0)  # LPS


def ijk_to_ras_of(node) -> np.ndarray:
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def node_array(node) -> np.ndarray:
    from vtk.util import numpy_support

    image = node.GetImageData()
    i, j, k = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k, j, i).copy()


def write_image(path: Path, array: np.ndarray, geometry: Volume) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(geometry.spacing)
    img.SetOrigin(geometry.origin)
    img.SetDirection(tuple(geometry.direction.ravel()))
    sitk.WriteImage(img, str(path))


def export_segment(scene, seg_node, segment_id: str, reference) -> np.ndarray:
    """A segment as a binary array on the reference's grid, through Slicer's segmentation logic."""
    import vtk

    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "export")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(seg_node, ids, labelmap, reference)
    assert ok
    assert np.allclose(ijk_to_ras_of(labelmap), ijk_to_ras_of(reference), atol=1e-6)
    out = node_array(labelmap) > 0
    scene.RemoveNode(labelmap)
    return out


# ----------------------------------------------------------------------------------------------- geometry
@pytest.mark.parametrize("direction", [OBLIQUE, OBLIQUE @ np.diag([1.0, 1.0, -1.0])], ids=["rotation", "left-handed"])
def test_volume_round_trip_oblique_anisotropic(direction):
    rng = np.random.default_rng(0)
    array = rng.integers(-500, 1500, size=(5, 7, 9)).astype(np.int16)
    volume = Volume(array, SPACING, ORIGIN, direction)
    scene = mrml.new_scene()
    node = mrml.volume_to_node(scene, volume, "oblique")

    # node geometry = the Volume's IJKToRAS, and = a hand computation (RAS = LPS with x, y negated)
    assert np.allclose(ijk_to_ras_of(node), volume.ijk_to_ras(), atol=1e-12)
    assert np.allclose(node.GetSpacing(), SPACING)
    assert np.allclose(node.GetOrigin(), (-ORIGIN[0], -ORIGIN[1], ORIGIN[2]))
    ijk = np.array([3.0, 5.0, 2.0])
    lps = np.asarray(ORIGIN) + direction @ (np.asarray(SPACING) * ijk)
    assert np.allclose((ijk_to_ras_of(node) @ np.r_[ijk, 1.0])[:3], [-lps[0], -lps[1], lps[2]])
    # voxels: numpy (k, j, i) order, unchanged
    assert np.array_equal(node_array(node), array)

    back = mrml.volume_from_node(node)
    assert back.array.dtype == np.int16 and np.array_equal(back.array, array)
    assert np.allclose(back.spacing, SPACING) and np.allclose(back.origin, ORIGIN)
    assert np.allclose(back.direction, direction, atol=1e-12)
    assert back.metadata["spacing_source"] == "file"


def test_volume_from_node_applies_linear_parent_transform():
    volume = Volume(np.zeros((2, 8, 8), np.uint8), (0.5, 0.5, 2.0), ORIGIN, OBLIQUE)
    scene = mrml.new_scene()
    node = mrml.volume_to_node(scene, volume, "moved")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    import vtk

    m = vtk.vtkMatrix4x4()
    m.SetElement(0, 3, 5.0)  # RAS: +x is towards the patient's right
    m.SetElement(2, 3, -2.0)
    transform.SetMatrixTransformToParent(m)
    node.SetAndObserveTransformNodeID(transform.GetID())
    back = mrml.volume_from_node(node)
    # RAS shift (+5, 0, -2) is LPS shift (-5, 0, -2)
    assert np.allclose(back.origin, np.asarray(ORIGIN) + [-5.0, 0.0, -2.0])
    assert np.allclose(back.direction, OBLIQUE)


def test_volume_from_node_refuses_missing_voxels_and_colour_becomes_grey():
    scene = mrml.new_scene()
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError):
        mrml.volume_from_node(empty)

    from vtk.util import numpy_support
    import vtk

    rgb = np.zeros((1, 8, 8, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 10
    image = vtk.vtkImageData()
    image.SetDimensions(8, 8, 1)
    scalars = numpy_support.numpy_to_vtk(rgb.reshape(-1, 3), deep=True)
    image.GetPointData().SetScalars(scalars)
    vnode = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "colour")
    vnode.SetAndObserveImageData(image)
    grey = mrml.volume_from_node(vnode)
    assert grey.array.shape == (1, 8, 8) and grey.array.dtype == np.uint8
    assert np.all(grey.array == round(0.299 * 200 + 0.587 * 100 + 0.114 * 10))


def test_export_volume_node_keeps_geometry_and_storage(tmp_path):
    array = np.arange(4 * 9 * 10, dtype=np.float32).reshape(4, 9, 10)
    volume = Volume(array, SPACING, ORIGIN, OBLIQUE)
    scene = mrml.new_scene()
    node = mrml.volume_to_node(scene, volume, "export me")
    before = node.GetStorageNode().GetFileName()
    path = mrml.export_volume_node(node, tmp_path / "in.nrrd")
    img = sitk.ReadImage(str(path))
    assert np.array_equal(sitk.GetArrayFromImage(img), array)
    assert np.allclose(img.GetSpacing(), SPACING) and np.allclose(img.GetOrigin(), ORIGIN)
    assert np.allclose(np.reshape(img.GetDirection(), (3, 3)), OBLIQUE)
    assert node.GetStorageNode().GetFileName() == before  # the node still points where it did


# ----------------------------------------------------------------------------------------------- findings
@pytest.fixture()
def findings_case(tmp_path):
    """A label map with two lesions of irregular shape, a heatmap, and the findings dict, all by hand."""
    shape = (6, 12, 14)
    labels = np.zeros(shape, np.uint8)
    labels[1:4, 2:6, 3:9] = 1
    labels[1, 2, 3] = 0  # not a box: the segment must follow the mask, not the bbox
    labels[3, 5, 8] = 0
    labels[3:6, 7:11, 1:3] = 2
    labels[5, 10, 2:4] = 2  # an L-shape: bbox i range 1..4
    geometry = Volume(np.zeros(shape, np.float32), SPACING, ORIGIN, OBLIQUE)
    rng = np.random.default_rng(1)
    heatmap = np.where(labels > 0, rng.uniform(0.05, 1.0, shape), 0.0).astype(np.float32)
    write_image(tmp_path / "labels.nrrd", labels, geometry)
    write_image(tmp_path / "heatmap.nrrd", heatmap, geometry)

    def lesion(i, bbox, p_malig, p_risk, orient, diam, vol, depth, text):
        return {
            "id": i, "bbox_kji": bbox, "centre_ras": list(geometry.array_index_to_ras([np.mean(b) for b in bbox])),
            "measurements": {"max_diameter_mm": diam, "volume_mm3": vol, "depth_from_skin_mm": depth, "orientation": orient},
            "probabilities": {"malignancy": p_malig, "high_risk": p_risk},
            "recommendation": {"birads_in": "4a", "birads_out": "3", "action": "downgrade", "rule": "r", "text": text},
        }

    findings = {
        "lesions": [
            lesion(2, [[3, 6], [7, 11], [1, 4]], 0.81, None, "not parallel", 3.5, 20.25, 6.0, "Keep BI-RADS 4a: biopsy."),
            lesion(1, [[1, 4], [2, 6], [3, 9]], 0.12, 0.3, "parallel", 4.2, 30.5, 1.5, "Downgrade to BI-RADS 3: follow-up."),
        ],
        "outputs": {"label_map": "labels.nrrd", "heatmap": "heatmap.nrrd"},
    }
    scene = mrml.new_scene()
    reference = mrml.volume_to_node(scene, geometry, "input")
    return {"dir": tmp_path, "labels": labels, "heatmap": heatmap, "geometry": geometry, "findings": findings,
            "scene": scene, "reference": reference}


def check_results(scene, ids, case, reference):
    """Everything add_findings_to_scene promises, checked against the hand-made inputs."""
    labels, geometry = case["labels"], case["geometry"]
    seg = scene.GetNodeByID(ids["segmentation"])
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2
    colours = set()
    for lid in (1, 2):
        sid = ids["segments"][lid]
        segment = segmentation.GetSegment(sid)
        assert np.array_equal(export_segment(scene, seg, sid, reference), labels == lid)  # voxel for voxel
        colours.add(tuple(round(c, 3) for c in segment.GetColor()))
        entry = slicer.vtkSlicerTerminologyEntry()
        assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(segment.GetTerminology(), entry)
        assert (entry.GetCategoryObject().GetCodingSchemeDesignator(), entry.GetCategoryObject().GetCodeValue()) == ("SCT", "49755003")
        assert entry.GetTypeObject().GetCodeValue() == "4147007"
        assert entry.GetRegionObject().GetCodeValue() == "76752008"
    assert len(colours) == 2
    assert segmentation.GetSegment(ids["segments"][1]).GetName() == "Lesion 1 (malignancy 0.12)"
    assert segmentation.GetSegment(ids["segments"][2]).GetName() == "Lesion 2 (malignancy 0.81)"

    heat = scene.GetNodeByID(ids["heatmap"])
    assert np.allclose(ijk_to_ras_of(heat), geometry.ijk_to_ras(), atol=1e-6)
    assert np.array_equal(node_array(heat), case["heatmap"])
    display = heat.GetDisplayNode()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)
    assert not display.GetAutoWindowLevel()
    assert scene.GetNodeByID(display.GetColorNodeID()) is not None

    table = scene.GetNodeByID(ids["table"])
    assert table.GetName() == "BreastDLR lesions"
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == [c[0] for c in mrml.TABLE_COLUMNS]
    assert table.GetNumberOfRows() == 2
    cell = table.GetCellText
    assert [cell(r, 0) for r in range(2)] == ["1", "2"]  # rows sorted by lesion id
    assert float(cell(0, 1)) == pytest.approx(4.2) and float(cell(1, 2)) == pytest.approx(20.25)
    assert float(cell(0, 3)) == pytest.approx(1.5)
    assert [cell(r, 4) for r in range(2)] == ["parallel", "not parallel"]
    assert float(cell(0, 5)) == pytest.approx(0.12) and float(cell(1, 5)) == pytest.approx(0.81)
    assert float(cell(0, 6)) == pytest.approx(0.3) and math.isnan(float(table.GetTable().GetValue(1, 6).ToDouble()))
    assert cell(1, 7) == "Keep BI-RADS 4a: biopsy."

    for lid, bbox in ((1, [[1, 4], [2, 6], [3, 9]]), (2, [[3, 6], [7, 11], [1, 4]])):
        roi = scene.GetNodeByID(ids["rois"][lid])
        (k0, k1), (j0, j1), (i0, i1) = bbox
        centre = geometry.index_to_ras([(i0 + i1 - 1) / 2, (j0 + j1 - 1) / 2, (k0 + k1 - 1) / 2])
        got = [0.0, 0.0, 0.0]
        roi.GetCenter(got)
        assert np.allclose(got, centre, atol=1e-4)
        assert np.allclose(roi.GetSize(), [(i1 - i0) * SPACING[0], (j1 - j0) * SPACING[1], (k1 - k0) * SPACING[2]], atol=1e-5)
        # every voxel centre of the lesion lies inside the oriented box, the outer ones half a voxel inside
        m = roi.GetObjectToWorldMatrix()
        world_to_box = np.linalg.inv(np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)]))
        kji = np.argwhere(labels == lid)
        ras = np.array([geometry.array_index_to_ras(p) for p in kji])
        local = (world_to_box @ np.c_[ras, np.ones(len(ras))].T)[:3].T
        half = np.asarray(roi.GetSize()) / 2
        assert np.all(np.abs(local) <= half - np.asarray(SPACING) / 2 + 1e-4)
        assert np.allclose(np.abs(local).max(axis=0), half - np.asarray(SPACING) / 2, atol=1e-4)


def test_findings_become_segments_rois_heatmap_and_table(findings_case):
    case = findings_case
    ids = mrml.add_findings_to_scene(case["scene"], case["findings"], case["dir"], case["reference"])
    check_results(case["scene"], ids, case, case["reference"])
    assert ids["focus_lesion"] == 2  # highest malignancy probability
    assert ids["focus_ras"] == pytest.approx(case["findings"]["lesions"][0]["centre_ras"])
    assert case["scene"].GetFirstNodeByName("BreastDLR labels (temporary)") is None
    for role, n in (("segmentation", 1), ("roi", 2), ("heatmap", 1), ("table", 1)):
        assert len(mrml.nodes_with_role(case["scene"], role)) == n


@pytest.mark.parametrize("target", ["folder", "scene.mrb"])
def test_saved_scene_restores_all_results(findings_case, target):
    case = findings_case
    ids = mrml.add_findings_to_scene(case["scene"], case["findings"], case["dir"], case["reference"])
    saved = mrml.save_scene(case["scene"], case["dir"] / "out" / target)
    fresh = mrml.load_scene(saved)
    reference = fresh.GetFirstNodeByName("input")
    assert reference is not None and np.allclose(ijk_to_ras_of(reference), case["geometry"].ijk_to_ras(), atol=1e-6)
    restored = {
        "segmentation": mrml.nodes_with_role(fresh, "segmentation")[0].GetID(),
        "heatmap": mrml.nodes_with_role(fresh, "heatmap")[0].GetID(),
        "table": mrml.nodes_with_role(fresh, "table")[0].GetID(),
        "rois": {int(n.GetAttribute("BreastDLR.LesionID")): n.GetID() for n in mrml.nodes_with_role(fresh, "roi")},
        "segments": ids["segments"],
    }
    check_results(fresh, restored, case, reference)


def test_no_lesions_gives_empty_segmentation_and_table(findings_case):
    case = findings_case
    write_image(case["dir"] / "labels.nrrd", np.zeros_like(case["labels"]), case["geometry"])
    findings = {"lesions": [], "outputs": {"label_map": "labels.nrrd", "heatmap": None}}
    ids = mrml.add_findings_to_scene(case["scene"], findings, case["dir"], case["reference"])
    scene = case["scene"]
    assert scene.GetNodeByID(ids["segmentation"]).GetSegmentation().GetNumberOfSegments() == 0
    assert scene.GetNodeByID(ids["table"]).GetNumberOfRows() == 0
    assert ids["rois"] == {} and ids["heatmap"] is None and ids["focus_ras"] is None


def test_lesion_missing_from_label_map_is_refused(findings_case):
    case = findings_case
    case["findings"]["lesions"].append(dict(case["findings"]["lesions"][1], id=3))
    with pytest.raises(BreastDLRError, match="Lesion 3"):
        mrml.add_findings_to_scene(case["scene"], case["findings"], case["dir"], case["reference"])


def test_scene_without_markups_support_is_refused_before_adding_anything(findings_case):
    case = findings_case
    bare = slicer.vtkMRMLScene()
    before = bare.GetNumberOfNodes()
    with pytest.raises(BreastDLRError, match="cannot store"):
        mrml.add_findings_to_scene(bare, case["findings"], case["dir"])
    assert bare.GetNumberOfNodes() == before


def test_most_suspicious_and_names_without_probabilities():
    a = {"id": 1, "probabilities": {"malignancy": None}, "measurements": {"volume_mm3": 5.0}}
    b = {"id": 2, "probabilities": {"malignancy": None}, "measurements": {"volume_mm3": 9.0}}
    c = {"id": 3, "probabilities": {"malignancy": 0.4}, "measurements": {"volume_mm3": 1.0}}
    assert mrml.most_suspicious([a, b])["id"] == 2
    assert mrml.most_suspicious([a, b, c])["id"] == 3
    assert mrml.most_suspicious([]) is None
    assert mrml.lesion_name(a) == "Lesion 1" and mrml.lesion_name(c) == "Lesion 3 (malignancy 0.40)"


def test_the_scene_shows_the_probabilities_the_decision_used():
    """Names, the focus lesion and the table follow the morphology model (reader outline), else the clinical
    fusion model, else the image model: the numbers beside a recommendation are the ones that made it."""
    reader = {"id": 1, "outline": "reader", "measurements": {},
              "probabilities": {"malignancy": 0.2, "malignancy_fused": 0.25, "malignancy_morphology": 0.9,
                                "high_risk": 0.3, "high_risk_morphology": 0.7}}
    fused = {"id": 2, "measurements": {}, "probabilities": {"malignancy": 0.8, "malignancy_fused": 0.6, "high_risk": 0.4}}
    from BreastDLRLib.recommend import decision_scores

    assert decision_scores(reader["probabilities"]) == (0.9, 0.7)
    assert decision_scores(fused["probabilities"]) == (0.6, 0.4)
    assert mrml.lesion_name(reader) == "Lesion 1 (malignancy 0.90)" and mrml.lesion_name(fused) == "Lesion 2 (malignancy 0.60)"
    assert mrml.most_suspicious([reader, fused])["id"] == 1
    row = mrml._table_row(reader)
    names = [c[0] for c in mrml.TABLE_COLUMNS]
    assert row[names.index("malignancy probability")] == 0.9 and row[names.index("high-risk probability")] == 0.7
    assert row[names.index("outline")] == "reader" and mrml._table_row(fused)[names.index("outline")] == "segmenter"


# ----------------------------------------------------------------------------------------------- reader outline
def test_a_reader_segmentation_exports_as_the_outline_analyze_reads(tmp_path):
    """Segments drawn on an oblique, anisotropic volume come back voxel for voxel on its grid, through the file
    the worker hands to ``analyze`` (read with the same ``read_mask`` the CLI uses)."""
    from BreastDLRLib.io import read_mask, read_volume

    shape = (6, 12, 14)
    image = Volume(np.random.default_rng(0).uniform(0, 200, shape).astype(np.float32), SPACING, ORIGIN, OBLIQUE)
    scene = mrml.new_scene()
    ref = mrml.volume_to_node(scene, image, "us")
    drawn = np.zeros(shape, np.uint8)
    drawn[1:4, 2:6, 3:9] = 1
    drawn[4:6, 8:11, 10:13] = 2
    seg, _ = mrml._add_segmentation(scene, drawn, image.ijk_to_ras(), [{"id": 1}, {"id": 2}], ref)
    seg.GetDisplayNode().SetSegmentVisibility("lesion_2", False)       # hidden segments are outlines too
    nodes_before = scene.GetNumberOfNodes()
    volume_path = mrml.export_volume_node(ref, tmp_path / "input.nrrd")
    path, source = mrml.export_outline(seg, ref, tmp_path / "outline.nrrd")
    assert source == "reader"     # drawn by hand here, not BreastDLR's own output
    assert scene.GetNumberOfNodes() == nodes_before    # the temporary label map is gone
    outline = read_mask(path, read_volume(volume_path))
    assert np.array_equal(outline > 0, drawn > 0)


def test_an_empty_or_misplaced_reader_segmentation_is_refused(tmp_path):
    shape = (4, 10, 10)
    image = Volume(np.ones(shape, np.float32), SPACING, ORIGIN, OBLIQUE)
    scene = mrml.new_scene()
    ref = mrml.volume_to_node(scene, image, "us")
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nothing")
    with pytest.raises(BreastDLRError, match="no segments"):
        mrml.export_outline(empty, ref, tmp_path / "a.nrrd")
    far = Volume(np.ones(shape, np.float32), SPACING, (500.0, 500.0, 500.0), OBLIQUE)   # drawn on another volume
    other = mrml.volume_to_node(scene, far, "elsewhere")
    drawn = np.zeros(shape, np.uint8)
    drawn[1:3, 2:5, 2:5] = 1
    seg, _ = mrml._add_segmentation(scene, drawn, far.ijk_to_ras(), [{"id": 1}], other)
    with pytest.raises(BreastDLRError, match="draws nothing inside"):
        mrml.export_outline(seg, ref, tmp_path / "b.nrrd")
    assert not (tmp_path / "a.nrrd").exists() and not (tmp_path / "b.nrrd").exists()


def test_breastdlrs_own_segmentation_unedited_is_the_segmenters_outline_and_edited_a_readers(findings_case, tmp_path):
    case = findings_case
    ids = mrml.add_findings_to_scene(case["scene"], case["findings"], case["dir"], case["reference"])
    seg = case["scene"].GetNodeByID(ids["segmentation"])
    _, source = mrml.export_outline(seg, case["reference"], tmp_path / "as_made.nrrd")
    assert source == "segmenter"
    saved = mrml.save_scene(case["scene"], tmp_path / "scene.mrb")             # the mark survives a saved scene
    fresh = mrml.load_scene(saved)
    again = mrml.nodes_with_role(fresh, "segmentation")[0]
    assert mrml.export_outline(again, fresh.GetFirstNodeByName("input"), tmp_path / "reloaded.nrrd")[1] == "segmenter"
    seg.GetSegmentation().RemoveSegment(ids["segments"][1])                      # the reader rejects lesion 1
    path, source = mrml.export_outline(seg, case["reference"], tmp_path / "edited.nrrd")
    assert source == "reader"
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))) > 0, case["labels"] == 2)

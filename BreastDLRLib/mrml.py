"""MRML adapter: engine volumes and findings in and out of a Slicer scene.

The only engine file that touches Slicer, and only its Qt-free part: ``slicer`` is imported inside the
functions, so this module imports anywhere; the functions run in desktop Slicer and in plain Python with the
``slicer-core`` wheel.  Every function takes the scene (or a node) as an argument; nothing here uses
``slicer.app``, ``slicer.mrmlScene``, Qt or the GUI helpers of ``slicer.util``.

* :func:`volume_from_node` / :func:`volume_to_node` — exact geometry both ways (IJKToRAS ⇄ LPS
  origin/direction/spacing of :class:`~BreastDLRLib.volume.Volume`).
* :func:`export_volume_node` — write a volume node to NRRD for the worker without touching its storage node.
* :func:`add_findings_to_scene` — the results of one analysis (``findings.json`` + label map + heatmap) as a
  segmentation (one coded segment per lesion), one ROI per lesion, a heatmap volume and a lesion table; every
  node has a storage node, so a saved scene (``.mrml`` folder or ``.mrb``) restores them.
* :func:`new_scene`, :func:`save_scene`, :func:`load_scene` — a headless scene set up like Slicer's, for
  scripts and tests.

Segment terminology (Slicer's ``vtkSegment`` terminology string; codes from DICOM PS3.16: CID 7150
"Segmentation Property Categories", CID 7151/7159 types, CID 4 "Anatomic Region"):
category SCT 49755003 "Morphologically Altered Structure", type SCT 4147007 "Mass",
anatomic region SCT 76752008 "Breast" (SNOMED CT "Breast structure").
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import BreastDLRError, InputError
from .recommend import decision_scores
from .volume import LPS_TO_RAS, Volume

ROLE_ATTRIBUTE = "BreastDLR.Role"
OUTLINE_HASH_ATTRIBUTE = "BreastDLR.OutlineSHA256"   # of the segmenter's outlines, to tell an edited copy
FINDINGS_ATTRIBUTE = "BreastDLR.Findings"

#: Slicer terminology string of a breast mass (see the module docstring for the codes).
BREAST_MASS_TERMINOLOGY = (
    "Segmentation category and type - DICOM master list"
    "~SCT^49755003^Morphologically Altered Structure"
    "~SCT^4147007^Mass"
    "~^^"
    "~Anatomic codes - DICOM master list"
    "~SCT^76752008^Breast"
    "~^^"
)

#: Distinct, colour-blind-friendly segment colours (Okabe–Ito), cycled over lesions.
LESION_COLOURS: Tuple[Tuple[float, float, float], ...] = (
    (0.835, 0.369, 0.000),  # vermillion
    (0.000, 0.447, 0.698),  # blue
    (0.902, 0.624, 0.000),  # orange
    (0.000, 0.620, 0.451),  # bluish green
    (0.800, 0.475, 0.655),  # reddish purple
    (0.337, 0.706, 0.914),  # sky blue
    (0.941, 0.894, 0.259),  # yellow
)

#: Colour tables tried for the heatmap, best first (file tables exist in desktop Slicer only).
HEATMAP_COLOUR_NODE_IDS = (
    "vtkMRMLColorTableNodeFileInferno.txt",
    "vtkMRMLColorTableNodeFileColdToHotRainbow.txt",
    "vtkMRMLColorTableNodeRainbow",
)
HEATMAP_VISIBLE_FROM = 1e-3  # heatmap values below this are transparent in slice views

#: Lesion table: (column name, value type, unit).
TABLE_COLUMNS: Tuple[Tuple[str, str, str], ...] = (
    ("id", "int", ""),
    ("max diameter mm", "double", "mm"),
    ("volume mm3", "double", "mm3"),
    ("depth mm", "double", "mm"),
    ("orientation", "string", ""),
    ("malignancy probability", "double", ""),
    ("high-risk probability", "double", ""),
    ("recommendation", "string", ""),
    ("outline", "string", ""),
)
TABLE_NAME = "BreastDLR lesions"
SEGMENTATION_NAME = "BreastDLR segmentation"
HEATMAP_NAME = "BreastDLR heatmap"


# ============================================================================================ matrices
def _to_vtk_matrix(m: np.ndarray):
    import vtk

    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def _from_vtk_matrix(m) -> np.ndarray:
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=float)


def node_ijk_to_ras(node, world: bool = True) -> np.ndarray:
    """The node's 4×4 IJKToRAS; with ``world`` its (linear) parent transforms are applied."""
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk_to_ras = _from_vtk_matrix(m)
    parent = node.GetParentTransformNode() if world else None
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise InputError(
                f"The volume '{node.GetName()}' is under a non-linear transform; harden the transform "
                "(Data module, right-click the transform, 'Harden transform') and try again."
            )
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        ijk_to_ras = _from_vtk_matrix(to_world) @ ijk_to_ras
    return ijk_to_ras


def geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray) -> Tuple[Tuple[float, ...], Tuple[float, ...], np.ndarray]:
    """(spacing, LPS origin, LPS direction) of a 4×4 IJKToRAS matrix."""
    lps = np.asarray(ijk_to_ras, dtype=float).copy()
    lps[:3, :] = LPS_TO_RAS @ lps[:3, :]
    cols = lps[:3, :3]
    spacing = np.linalg.norm(cols, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(spacing)):
        raise InputError("The volume's IJK-to-RAS matrix has a zero or invalid voxel size; its geometry is damaged.")
    return tuple(float(s) for s in spacing), tuple(float(o) for o in lps[:3, 3]), cols / spacing


# ============================================================================================ arrays
def _image_array(image) -> np.ndarray:
    """Voxels of a vtkImageData as a (k, j, i[, c]) numpy copy."""
    from vtk.util import numpy_support

    scalars = image.GetPointData().GetScalars() if image is not None else None
    if scalars is None:
        raise InputError("The volume has no voxels; load an image into it first.")
    i, j, k = image.GetDimensions()
    comps = scalars.GetNumberOfComponents()
    arr = numpy_support.vtk_to_numpy(scalars)
    shape = (k, j, i) if comps == 1 else (k, j, i, comps)
    return np.array(arr.reshape(shape), copy=True)


def _vtk_image(array: np.ndarray):
    """A vtkImageData (origin 0, spacing 1 as MRML expects) holding a copy of a (k, j, i) array."""
    import vtk
    from vtk.util import numpy_support

    a = np.asarray(array)
    if a.dtype == bool:
        a = a.astype(np.uint8)
    if a.dtype == np.float16:
        a = a.astype(np.float32)
    a = np.ascontiguousarray(a)
    image = vtk.vtkImageData()
    image.SetDimensions(a.shape[2], a.shape[1], a.shape[0])
    scalars = numpy_support.numpy_to_vtk(a.ravel(), deep=True, array_type=numpy_support.get_vtk_array_type(a.dtype))
    scalars.SetNumberOfComponents(1)
    image.GetPointData().SetScalars(scalars)
    return image


def _to_grey(a: np.ndarray) -> np.ndarray:
    """RGB(A) ultrasound frames to grey (ITU-R BT.601 luma), keeping the dtype's range."""
    if a.ndim == 3:
        return a
    c = a.shape[-1]
    if c in (3, 4):
        grey = a[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    else:
        grey = a.astype(np.float64).mean(axis=-1)
    if np.issubdtype(a.dtype, np.integer):
        return np.rint(grey).astype(a.dtype)
    return grey.astype(a.dtype)


# ============================================================================================ volumes
def volume_from_node(node) -> Volume:
    """A :class:`Volume` with the node's voxels (shape (k, j, i)) and exact world geometry.

    Colour volumes become grey; a linear parent transform is applied to the geometry; a non-linear one is
    refused.  ``metadata`` holds no patient identifiers: ``source`` is the base name of the node's file (or
    ``"slicer_volume"``).
    """
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError("Select a scalar (grey-level or colour) volume as the input.")
    image = node.GetImageData()
    array = _to_grey(_image_array(image))
    ijk_to_ras = node_ijk_to_ras(node, world=True)
    extent = image.GetExtent()
    if extent[0] or extent[2] or extent[4]:  # voxel (0,0,0) of the array sits at the extent's start
        ijk_to_ras[:3, 3] = (ijk_to_ras @ np.array([extent[0], extent[2], extent[4], 1.0]))[:3]
    spacing, origin, direction = geometry_from_ijk_to_ras(ijk_to_ras)
    storage = node.GetStorageNode()
    fname = storage.GetFileName() if storage is not None else None
    spacing_source = "unknown" if np.allclose(spacing, 1.0) else "file"
    metadata = {
        "source": os.path.basename(fname) if fname else "slicer_volume",
        "spacing_source": spacing_source,
        "modality": node.GetAttribute("DICOM.Modality") or "US",
    }
    return Volume(array, spacing, origin, direction, metadata)


def volume_to_node(scene, volume: Volume, name: str, node=None, label_map: bool = False):
    """Add (or update ``node`` with) a scalar volume node holding a copy of ``volume``, with display and
    storage nodes; returns the node."""
    cls = "vtkMRMLLabelMapVolumeNode" if label_map else "vtkMRMLScalarVolumeNode"
    if node is None:
        node = scene.AddNewNodeByClass(cls, name)
    node.SetIJKToRASMatrix(_to_vtk_matrix(volume.ijk_to_ras()))
    node.SetAndObserveImageData(_vtk_image(volume.array))
    if node.GetDisplayNode() is None:
        node.CreateDefaultDisplayNodes()
    _ensure_storage(node)
    return node


def export_volume_node(node, path: os.PathLike) -> Path:
    """Write a volume node (its world geometry, grey) to an image file, leaving the node's storage node alone."""
    import SimpleITK as sitk

    path = Path(path)
    volume = volume_from_node(node)
    image = sitk.GetImageFromArray(volume.array)
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(tuple(float(x) for x in volume.direction.ravel()))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def outline_hash(labels: np.ndarray) -> str:
    """sha256 of which voxels are inside any lesion (shape included)."""
    import hashlib

    inside = np.ascontiguousarray(np.asarray(labels) > 0)
    return hashlib.sha256(repr(inside.shape).encode() + np.packbits(inside).tobytes()).hexdigest()


def export_outline(segmentation_node, reference_node, path: os.PathLike) -> Tuple[Path, str]:
    """Write the segments of ``segmentation_node`` (lesion outlines, all segments, visible or not) as a label map
    on the grid of ``reference_node`` (the analysed volume), for ``analyze``'s ``outline``.

    Returns the file and who drew the outline: ``"segmenter"`` when it is BreastDLR's own segmentation left as
    the segmenter made it (the morphology models must not score it as a reader's), else ``"reader"``.
    Raises :class:`BreastDLRError` when the segmentation draws nothing inside that volume.
    """
    import slicer
    import vtk

    scene = segmentation_node.GetScene()
    ids = vtk.vtkStringArray()
    segmentation_node.GetSegmentation().GetSegmentIDs(ids)
    if ids.GetNumberOfValues() == 0:
        raise BreastDLRError(f"The lesion outline '{segmentation_node.GetName()}' has no segments; draw the lesion "
                             "in the Segment Editor or leave the outline empty to let the segmenter find it.")
    before = {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())}
    label = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "BreastDLR outline export")
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(segmentation_node, ids, label,
                                                                                      reference_node):
            raise BreastDLRError(f"The lesion outline '{segmentation_node.GetName()}' could not be placed on "
                                 f"'{reference_node.GetName()}'.")
        drawn = _image_array(label.GetImageData())
        if not np.any(drawn > 0):
            raise BreastDLRError(f"The lesion outline '{segmentation_node.GetName()}' draws nothing inside "
                                 f"'{reference_node.GetName()}'; draw the lesion on this image.")
        unedited = segmentation_node.GetAttribute(OUTLINE_HASH_ATTRIBUTE) == outline_hash(drawn)
        return export_volume_node(label, path), "segmenter" if unedited else "reader"
    finally:   # the label map and what the export made for it (display, colour table) leave the scene
        for node in [scene.GetNthNode(n) for n in range(scene.GetNumberOfNodes())]:
            if node is not None and node.GetID() not in before:
                scene.RemoveNode(node)


def _read_volume_file(scene, path: Path, name: str, label_map: bool = False):
    """Load an image file into a new volume node with an archetype storage node pointing at it."""
    cls = "vtkMRMLLabelMapVolumeNode" if label_map else "vtkMRMLScalarVolumeNode"
    node = scene.AddNewNodeByClass(cls, name)
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    storage.SetSingleFile(True)
    storage.SetCenterImage(0)
    if not storage.ReadData(node):
        scene.RemoveNode(node)
        scene.RemoveNode(storage)
        raise InputError(f"Could not read {path.name}; the analysis results are damaged. Run the analysis again.")
    node.SetAndObserveStorageNodeID(storage.GetID())
    return node


# ============================================================================================ findings
def _fmt_prob(p: Optional[float]) -> str:
    return "n/a" if p is None else f"{float(p):.2f}"


def lesion_name(lesion: Mapping[str, Any]) -> str:
    """'Lesion 1 (malignancy 0.72)', or 'Lesion 1' when no probability was computed."""
    p = decision_scores(lesion.get("probabilities") or {})[0]
    return f"Lesion {lesion['id']}" + ("" if p is None else f" (malignancy {_fmt_prob(p)})")


def most_suspicious(lesions: Sequence[Mapping[str, Any]]) -> Optional[Mapping[str, Any]]:
    """The lesion with the highest malignancy probability (ties and missing ones: the largest)."""
    if not lesions:
        return None

    def key(l: Mapping[str, Any]):
        p = decision_scores(l.get("probabilities") or {})[0]
        vol = (l.get("measurements") or {}).get("volume_mm3") or 0.0
        return (-1.0 if p is None else float(p), float(vol))

    return max(lesions, key=key)


def _ensure_storage(node) -> None:
    """Give ``node`` its default storage node, so a saved scene keeps it; refuse scenes that cannot."""
    if node.GetStorageNode() is None:
        node.AddDefaultStorageNode()
    if node.GetStorageNode() is None:
        raise BreastDLRError(
            f"The scene cannot store '{node.GetName()}' ({node.GetClassName()}); its module is not registered. "
            "In plain Python create the scene with BreastDLRLib.mrml.new_scene()."
        )


STORAGE_CLASSES = ("vtkMRMLSegmentationStorageNode", "vtkMRMLMarkupsROIJsonStorageNode", "vtkMRMLTableStorageNode",
                   "vtkMRMLVolumeArchetypeStorageNode")


def _require_storage_classes(scene) -> None:
    """Refuse, before adding anything, a scene that could not save the results."""
    missing = [c for c in STORAGE_CLASSES if not scene.IsNodeClassRegistered(c)]
    if missing:
        raise BreastDLRError(
            f"The scene cannot store the results ({', '.join(missing)} not registered). "
            "In plain Python create the scene with BreastDLRLib.mrml.new_scene()."
        )


def _bbox_from_labels(labels: np.ndarray) -> Dict[int, Tuple[slice, slice, slice]]:
    from scipy import ndimage

    out = {}
    for lid, sl in enumerate(ndimage.find_objects(labels.astype(np.int64, copy=False)), start=1):
        if sl is not None:
            out[lid] = sl
    return out


def _shared_labelmap(labels: np.ndarray, ids: Sequence[int], boxes, ijk_to_ras: np.ndarray):
    """One vtkOrientedImageData with the given lesion ids (others zeroed), cropped to their joint bbox and
    placed at its index position in the label map: the segments share it as one layer (label value = id)."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    lo = np.min([[s.start for s in boxes[i]] for i in ids], axis=0)
    hi = np.max([[s.stop for s in boxes[i]] for i in ids], axis=0)
    crop = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    values = np.where(np.isin(crop, ids), crop, 0)
    big = max(ids) > 255
    image = slicer.vtkOrientedImageData()
    image.SetExtent(int(lo[2]), int(hi[2]) - 1, int(lo[1]), int(hi[1]) - 1, int(lo[0]), int(hi[0]) - 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_SHORT if big else vtk.VTK_UNSIGNED_CHAR, 1)
    numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = values.astype(np.uint16 if big else np.uint8).ravel()
    image.SetImageToWorldMatrix(_to_vtk_matrix(ijk_to_ras))
    return image


def _segment_colour(index: int) -> Tuple[float, float, float]:
    return LESION_COLOURS[index % len(LESION_COLOURS)]


def _add_segmentation(scene, labels: np.ndarray, ijk_to_ras: np.ndarray, lesions, reference_node):
    import slicer

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", SEGMENTATION_NAME)
    node.CreateDefaultDisplayNodes()
    if reference_node is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    segmentation = node.GetSegmentation()
    binary = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    segmentation.SetSourceRepresentationName(binary)
    boxes = _bbox_from_labels(labels)
    ordered = sorted(lesions, key=lambda l: int(l["id"]))
    missing = [int(l["id"]) for l in ordered if int(l["id"]) not in boxes]
    if missing:
        raise BreastDLRError(
            f"Lesion {missing[0]} is listed in the findings but absent from the label map; the results are "
            "inconsistent. Run the analysis again."
        )
    shared = _shared_labelmap(labels, [int(l["id"]) for l in ordered], boxes, ijk_to_ras) if ordered else None
    segment_ids: Dict[int, str] = {}
    for index, lesion in enumerate(ordered):
        lid = int(lesion["id"])
        segment = slicer.vtkSegment()
        segment.SetName(lesion_name(lesion))
        segment.SetColor(*_segment_colour(index))
        segment.SetTerminology(BREAST_MASS_TERMINOLOGY)
        segment.AddRepresentation(binary, shared)
        segment.SetLabelValue(lid)
        sid = f"lesion_{lid}"
        segmentation.AddSegment(segment, sid)
        segment_ids[lid] = sid
    _ensure_storage(node)
    node.SetAttribute(ROLE_ATTRIBUTE, "segmentation")
    return node, segment_ids


def roi_geometry(bbox_kji: Sequence[Sequence[int]], ijk_to_ras: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centre RAS, size mm along the volume's i, j, k axes, 3×3 RAS axes) of a half-open voxel bbox.

    The box covers the voxels' full extent (edges half a voxel outside the outer voxel centres) and is
    oriented like the volume, so it is tight also for oblique volumes.
    """
    (k0, k1), (j0, j1), (i0, i1) = [(int(a), int(b)) for a, b in bbox_kji]
    centre_ijk = np.array([(i0 + i1 - 1) / 2.0, (j0 + j1 - 1) / 2.0, (k0 + k1 - 1) / 2.0, 1.0])
    centre = (ijk_to_ras @ centre_ijk)[:3]
    cols = ijk_to_ras[:3, :3]
    spacing = np.linalg.norm(cols, axis=0)
    axes = cols / spacing
    if np.linalg.det(axes) < 0:  # an ROI frame must be right-handed; the box is symmetric in k
        axes[:, 2] = -axes[:, 2]
    size = np.array([i1 - i0, j1 - j0, k1 - k0], dtype=float) * spacing
    return centre, size, axes


def _add_roi(scene, lesion: Mapping[str, Any], bbox_kji, ijk_to_ras: np.ndarray, colour):
    centre, size, axes = roi_geometry(bbox_kji, ijk_to_ras)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", f"Lesion {lesion['id']} box")
    frame = np.eye(4)
    frame[:3, :3] = axes
    frame[:3, 3] = centre
    roi.SetAndObserveObjectToNodeMatrix(_to_vtk_matrix(frame))
    roi.SetSize(*[float(s) for s in size])
    roi.SetLocked(True)
    roi.CreateDefaultDisplayNodes()
    display = roi.GetDisplayNode()
    if display is not None:
        display.SetSelectedColor(*colour)
        display.SetColor(*colour)
        display.SetFillOpacity(0.0)
    _ensure_storage(roi)
    roi.SetAttribute(ROLE_ATTRIBUTE, "roi")
    roi.SetAttribute("BreastDLR.LesionID", str(lesion["id"]))
    return roi


def _heatmap_colour_node(scene):
    for cid in HEATMAP_COLOUR_NODE_IDS:
        node = scene.GetNodeByID(cid)
        if node is not None:
            return node
    node = scene.GetFirstNodeByName("BreastDLR heat")
    if node is not None:
        return node
    # No default colour tables in this scene: a black→red→yellow→white table of our own, saved with it.
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "BreastDLR heat")
    node.SetTypeToUser()
    node.SetNumberOfColors(256)
    for n in range(256):
        t = n / 255.0
        node.SetColor(n, f"{n}", min(1.0, 3 * t), min(1.0, max(0.0, 3 * t - 1)), min(1.0, max(0.0, 3 * t - 2)), 1.0)
    _ensure_storage(node)
    return node


def _add_heatmap(scene, path: Path):
    node = _read_volume_file(scene, path, HEATMAP_NAME)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID(_heatmap_colour_node(scene).GetID())
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.AutoThresholdOff()
    display.SetThreshold(HEATMAP_VISIBLE_FROM, 1.0)
    display.ApplyThresholdOn()
    node.SetAttribute(ROLE_ATTRIBUTE, "heatmap")
    return node


def _table_row(lesion: Mapping[str, Any]) -> List[Any]:
    m = lesion.get("measurements") or {}
    mal, risk = decision_scores(lesion.get("probabilities") or {})
    rec = lesion.get("recommendation") or {}
    text = rec.get("text") or rec.get("action") or ""

    def num(x):
        return float("nan") if x is None else float(x)

    return [int(lesion["id"]), num(m.get("max_diameter_mm")), num(m.get("volume_mm3")),
            num(m.get("depth_from_skin_mm")), str(m.get("orientation") or ""),
            num(mal), num(risk), str(text), str(lesion.get("outline") or "segmenter")
            + (" (uncertain: check)" if lesion.get("outline_uncertain") else "")]


def _add_table(scene, lesions: Sequence[Mapping[str, Any]]):
    import vtk

    table = scene.AddNewNodeByClass("vtkMRMLTableNode", TABLE_NAME)
    rows = [_table_row(l) for l in sorted(lesions, key=lambda l: int(l["id"]))]
    makers = {"int": vtk.vtkIntArray, "double": vtk.vtkDoubleArray, "string": vtk.vtkStringArray}
    for c, (name, kind, unit) in enumerate(TABLE_COLUMNS):
        array = makers[kind]()
        array.SetName(name)
        array.SetNumberOfValues(len(rows))
        for r, row in enumerate(rows):
            array.SetValue(r, row[c])
        table.AddColumn(array)
        if unit:
            table.SetColumnUnitLabel(name, unit)
    table.SetColumnDescription("depth mm", "Depth from the skin line (depth_from_skin_mm of the findings)")
    table.SetColumnDescription("recommendation", "Research use only: not a medical device")
    _ensure_storage(table)
    table.SetAttribute(ROLE_ATTRIBUTE, "table")
    return table


def add_findings_to_scene(scene, findings: Mapping[str, Any], findings_dir: os.PathLike, reference_node=None) -> Dict[str, Any]:
    """Put one analysis into ``scene``; returns the created node IDs and where to look first.

    Returns ``{"segmentation": id, "segments": {lesion_id: segment_id}, "rois": {lesion_id: id},
    "heatmap": id | None, "table": id, "focus_lesion": lesion_id | None, "focus_ras": [x, y, z] | None}``.
    The label map and heatmap are read from ``findings_dir`` (paths in ``findings["outputs"]``).
    """
    _require_storage_classes(scene)
    findings_dir = Path(findings_dir)
    outputs = findings.get("outputs") or {}
    lesions = list(findings.get("lesions") or [])
    label_path = findings_dir / (outputs.get("label_map") or "labels.nrrd")
    if not label_path.is_file():
        raise InputError(f"The analysis results lack their label map ({label_path.name}); run the analysis again.")

    label_node = _read_volume_file(scene, label_path, "BreastDLR labels (temporary)", label_map=True)
    try:
        labels = _image_array(label_node.GetImageData())
        ijk_to_ras = node_ijk_to_ras(label_node, world=False)
        seg_node, segment_ids = _add_segmentation(scene, labels, ijk_to_ras, lesions, reference_node or label_node)
        seg_node.SetAttribute(OUTLINE_HASH_ATTRIBUTE, outline_hash(labels))   # the segmenter's outlines, as made
        boxes = _bbox_from_labels(labels)
    finally:
        storage = label_node.GetStorageNode()
        scene.RemoveNode(label_node)
        if storage is not None:
            scene.RemoveNode(storage)

    rois: Dict[int, str] = {}
    for index, lesion in enumerate(sorted(lesions, key=lambda l: int(l["id"]))):
        lid = int(lesion["id"])
        bbox = lesion.get("bbox_kji")
        if not bbox:
            sl = boxes[lid]
            bbox = [[s.start, s.stop] for s in sl]
        rois[lid] = _add_roi(scene, lesion, bbox, ijk_to_ras, _segment_colour(index)).GetID()

    heatmap_id = None
    if outputs.get("heatmap"):
        hpath = findings_dir / outputs["heatmap"]
        if hpath.is_file():
            heatmap_id = _add_heatmap(scene, hpath).GetID()

    table = _add_table(scene, lesions)
    focus = most_suspicious(lesions)
    for nid in [seg_node.GetID(), table.GetID(), heatmap_id, *rois.values()]:
        if nid:
            scene.GetNodeByID(nid).SetAttribute(FINDINGS_ATTRIBUTE, str(findings_dir / "findings.json"))
    return {
        "segmentation": seg_node.GetID(),
        "segments": segment_ids,
        "rois": rois,
        "heatmap": heatmap_id,
        "table": table.GetID(),
        "focus_lesion": None if focus is None else int(focus["id"]),
        "focus_ras": None if focus is None or not focus.get("centre_ras") else [float(x) for x in focus["centre_ras"]],
    }


# ============================================================================================ scenes
def new_scene():
    """A headless scene set up like Slicer's: node classes of the markups, segmentations, tables and volumes
    modules registered, default colour tables, and cache/data-IO managers (so that ``.mrb`` bundles read)."""
    import tempfile

    import slicer

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    colour_logic = app_logic.GetColorLogic()
    colour_logic.SetMRMLScene(scene)
    colour_logic.AddDefaultColorNodes()
    keep = [app_logic, colour_logic]
    for cls in ("vtkSlicerMarkupsLogic", "vtkSlicerSegmentationsModuleLogic", "vtkSlicerTablesLogic",
                "vtkSlicerVolumesLogic", "vtkSlicerSubjectHierarchyModuleLogic"):
        logic = getattr(slicer, cls)()
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)  # registers the module's node classes (needed to read saved scenes)
        keep.append(logic)
    cache_dir = Path(tempfile.mkdtemp(prefix="breastdlr-mrml-cache-"))
    (cache_dir / ".slicer-cache").touch()
    cache = slicer.vtkCacheManager()
    cache.SetRemoteCacheDirectory(str(cache_dir))
    scene.SetCacheManager(cache)
    io = slicer.vtkDataIOManager()
    io.SetCacheManager(cache)
    scene.SetDataIOManager(io)
    keep += [cache, io]
    scene._breastdlr_keep = keep  # the helpers live as long as the scene
    return scene


def save_scene(scene, path: os.PathLike) -> Path:
    """Save the scene with its data: ``*.mrb`` → a bundle file, otherwise a folder (``<folder>/<name>.mrml`` +
    ``Data/``).  Raises :class:`BreastDLRError` when Slicer reports a failure."""
    import slicer

    path = Path(path)
    if path.suffix.lower() == ".mrb":
        path.parent.mkdir(parents=True, exist_ok=True)
        ok = scene.WriteToMRB(str(path))
    else:
        path.mkdir(parents=True, exist_ok=True)
        app_logic = slicer.vtkSlicerApplicationLogic()
        app_logic.SetMRMLScene(scene)
        ok = app_logic.SaveSceneToSlicerDataBundleDirectory(str(path))
    if not ok:
        raise BreastDLRError(f"Saving the scene to {path.name} failed; check the folder is writable and has space.")
    return path


def load_scene(path: os.PathLike, scene=None):
    """Read a saved scene (``.mrb`` file, ``.mrml`` file or a folder holding one) into ``scene`` (a new one
    by default) and return it."""
    path = Path(path)
    scene = scene if scene is not None else new_scene()
    if path.suffix.lower() == ".mrb":
        ok = scene.ReadFromMRB(str(path))
    else:
        mrml = path if path.suffix.lower() == ".mrml" else next(iter(sorted(path.glob("*.mrml"))), None)
        if mrml is None:
            raise InputError(f"No .mrml scene file in {path}.")
        scene.SetURL(str(mrml))
        ok = scene.Import()
    if not ok:
        raise InputError(f"Slicer could not read the scene {path.name}.")
    return scene


def nodes_with_role(scene, role: str) -> List[Any]:
    """Nodes created by :func:`add_findings_to_scene` with the given role (segmentation, roi, heatmap, table)."""
    out = []
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        if node is not None and node.GetAttribute(ROLE_ATTRIBUTE) == role:
            out.append(node)
    return out


__all__ = [
    "BREAST_MASS_TERMINOLOGY", "TABLE_COLUMNS", "add_findings_to_scene", "export_volume_node", "geometry_from_ijk_to_ras",
    "lesion_name", "load_scene", "most_suspicious", "new_scene", "node_ijk_to_ras", "nodes_with_role", "roi_geometry",
    "save_scene", "volume_from_node", "volume_to_node",
]

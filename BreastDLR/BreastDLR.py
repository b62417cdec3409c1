"""BreastDLR: deep-learning radiomics of breast lesions on ultrasound, as a 3D Slicer module.

The analysis runs in a separate Python process (``BreastDLRLib.worker``) so that Slicer stays responsive and
Cancel can stop it at once; its results come back into the scene through ``BreastDLRLib.mrml``.
Research use only; not a medical device.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Dict, List, Optional

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def _ensureEngineImportable() -> None:
    """In a source checkout the engine package sits next to this module's folder, not in it."""
    try:
        import BreastDLRLib  # noqa: F401
    except ImportError:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if os.path.isdir(os.path.join(root, "BreastDLRLib")) and root not in sys.path:
            sys.path.insert(0, root)


_ensureEngineImportable()

BIRADS_CHOICES = ["unknown", "2", "3", "4a", "4b", "4c", "5"]
DEVICE_CHOICES = ["auto", "cpu", "cuda"]


#
# BreastDLR
#
class BreastDLR(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("BreastDLR")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = ["Segmentations", "Markups", "Tables", "SampleData"]
        self.parent.contributors = ["BreastDLR contributors"]
        self.parent.helpText = _(
            "Finds breast lesions on 2D or 3D (ABVS) ultrasound, measures them, estimates the probability of "
            "malignancy and of a high-risk lesion, shows where the models looked (heatmap), and suggests whether "
            "a BI-RADS 4a category could be downgraded. Research use only: not a medical device."
        )
        self.parent.helpText += self.getDefaultModuleDocumentationLink()
        self.parent.acknowledgementText = _(
            "BreastDLR implements published deep-learning radiomics methods for breast ultrasound; see the "
            "extension's documentation for the references and the models' cards."
        )
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Add the BreastDLR samples to the Sample Data module (checksums from Resources/Samples/samples.json)."""
    from BreastDLRSlicerLib.samples import register_samples

    try:
        register_samples()
    except Exception as exc:  # a broken samples.json must not break Slicer's start-up
        logging.warning(f"BreastDLR: sample data not registered: {exc}")


#
# Parameter node
#
@parameterNodeWrapper
class BreastDLRParameterNode:
    """inputVolume: the ultrasound image or volume. modelPath: the chosen classification bundle ("" = the shipped
    defaults). birads / device: as chosen. spacingOverride: mm per pixel when the file has none (0 = from the file).
    heatmapOpacity: foreground opacity of the heatmap. lesionOutline: the reader's own outline (optional; None =
    automatic segmentation). output*: the last results."""

    inputVolume: vtkMRMLScalarVolumeNode
    lesionOutline: vtkMRMLSegmentationNode
    modelPath: str = ""
    birads: Annotated[str, Choice(BIRADS_CHOICES)] = "unknown"
    device: Annotated[str, Choice(DEVICE_CHOICES)] = "auto"
    spacingOverride: Annotated[float, WithinRange(0.0, 5.0)] = 0.0
    heatmapOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    outputSegmentation: vtkMRMLSegmentationNode
    outputTable: vtkMRMLTableNode
    outputHeatmap: vtkMRMLScalarVolumeNode


#
# Widget
#
class BreastDLRWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[BreastDLRLogic] = None
        self._parameterNode: Optional[BreastDLRParameterNode] = None
        self._parameterNodeGuiTag = None
        self._bundles: List[Dict[str, Any]] = []
        self._clinicalForm = None
        self._monitor = None
        self._reportPath: Optional[Path] = None
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(200)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        from BreastDLRSlicerLib.clinical_form import ClinicalForm

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/BreastDLR.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = BreastDLRLogic()
        self._clinicalForm = ClinicalForm(self.ui.clinicalFormWidget.layout())

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.showReportButton.connect("clicked(bool)", self.onShowReport)
        self._pollTimer.connect("timeout()", self.onPoll)

        self.ui.progressBar.setVisible(False)
        self.ui.showReportButton.setEnabled(False)
        self.ui.notesLabel.setVisible(False)   # the analysis notes, shown with the results
        self.initializeParameterNode()
        self.refreshModels()

    def cleanup(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        self._pollTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[BreastDLRParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        self._checkCanApply()
        if self._parameterNode and self._parameterNode.outputHeatmap:
            self.logic.setHeatmapOpacity(self._parameterNode.outputHeatmap, self._parameterNode.heatmapOpacity)

    def _checkCanApply(self) -> None:
        if self._monitor is not None:
            self.ui.applyButton.setText(_("Cancel"))
            self.ui.applyButton.setToolTip(_("Stop the analysis; nothing is added to the scene."))
            self.ui.applyButton.setEnabled(True)
        elif self._parameterNode and self._parameterNode.inputVolume:
            self.ui.applyButton.setText(_("Apply"))
            self.ui.applyButton.setToolTip(_("Find, measure and classify the lesions of the input volume."))
            self.ui.applyButton.setEnabled(True)
        else:
            self.ui.applyButton.setText(_("Apply"))
            self.ui.applyButton.setToolTip(_("Select an input volume first."))
            self.ui.applyButton.setEnabled(False)

    # -------------------------------------------------------------------------------- models and form
    def refreshModels(self) -> None:
        from BreastDLRSlicerLib.models import model_choices

        with slicer.util.tryWithErrorDisplay(_("Failed to list the installed models.")):
            self._bundles = self.logic.listBundles()
            wanted = self._parameterNode.modelPath if self._parameterNode else ""
            self.ui.modelSelector.blockSignals(True)
            self.ui.modelSelector.clear()
            for label, path in model_choices(self._bundles):
                self.ui.modelSelector.addItem(label, path)
            index = max(0, self.ui.modelSelector.findData(wanted))
            self.ui.modelSelector.setCurrentIndex(index)
            self.ui.modelSelector.blockSignals(False)
            self.onModelChanged(index)

    def onModelChanged(self, index: int) -> None:
        from BreastDLRSlicerLib.models import clinical_variables_for

        path = self.ui.modelSelector.itemData(index) or ""
        if self._parameterNode:
            self._parameterNode.modelPath = path
        variables = clinical_variables_for(self._bundles, path)
        self._clinicalForm.build(variables)
        if variables:
            self.ui.clinicalHelpLabel.setText(_("Unknown values are allowed unless marked *; the model then handles them as missing."))
        else:
            self.ui.clinicalHelpLabel.setText(_("This model uses no clinical information."))

    def onImportModel(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Choose a BreastDLR model folder"))
        if not folder:
            return
        with slicer.util.tryWithErrorDisplay(_("The model could not be imported."), waitCursor=True):
            try:
                path = self.logic.importModel(folder, overwrite=False)
            except FileExistsError:
                if not slicer.util.confirmOkCancelDisplay(_("A model of this name is already imported. Replace it?")):
                    return
                path = self.logic.importModel(folder, overwrite=True)
            if self._parameterNode:
                self._parameterNode.modelPath = str(path)
            self.refreshModels()
            slicer.util.showStatusMessage(_("Model imported."), 3000)

    # -------------------------------------------------------------------------------- run
    def onApplyButton(self) -> None:
        if self._monitor is not None:
            self.ui.statusLabel.setText(_("Cancelling…"))
            self._monitor.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("The analysis could not be started."), waitCursor=True):
            missing = self._clinicalForm.missing_required()
            if missing:
                raise ValueError(_("This model needs: {names}. Enter them in 'Clinical information'.").format(names=", ".join(missing)))
            p = self._parameterNode
            self._monitor = self.logic.start(
                p.inputVolume,
                clinical=self._clinicalForm.values() or None,
                birads=p.birads,
                modelPaths=self.logic.modelPathsFor(p.modelPath),
                device=p.device,
                spacing=p.spacingOverride or None,
                progressCallback=self._onProgress,
                outlineNode=p.lesionOutline,
            )
            self.ui.progressBar.setValue(0)
            self.ui.progressBar.setVisible(True)
            self.ui.statusLabel.setText(_("Starting…"))
            self._pollTimer.start()
        self._checkCanApply()

    def _onProgress(self, stage: str, fraction: float, message: str) -> None:
        self.ui.progressBar.setValue(int(round(100 * fraction)))
        self.ui.statusLabel.setText(message or stage)

    def onPoll(self) -> None:
        if self._monitor is None:
            self._pollTimer.stop()
            return
        outcome = self._monitor.poll()
        if outcome is None:
            return
        self._pollTimer.stop()
        self._monitor = None
        self.ui.progressBar.setVisible(False)
        self._checkCanApply()
        if outcome.status == "done":
            with slicer.util.tryWithErrorDisplay(_("The results could not be loaded."), waitCursor=True):
                findings = self.logic.loadResults(outcome, self._parameterNode.inputVolume)
                self.showResults(findings, outcome.findings)
                self.ui.statusLabel.setText(_("Done: {n} lesion(s) found.").format(n=len(findings.get("lesions", []))))
        elif outcome.status == "cancelled":
            self.ui.statusLabel.setText(outcome.message)
        else:
            self.ui.statusLabel.setText(_("Failed."))
            slicer.util.errorDisplay(outcome.message, detailedText=outcome.log)

    # -------------------------------------------------------------------------------- results
    def showResults(self, findings: Dict[str, Any], findingsPath: Path) -> None:
        ids = self.logic.lastResults or {}
        p = self._parameterNode
        scene = slicer.mrmlScene
        p.outputSegmentation = scene.GetNodeByID(ids.get("segmentation")) if ids.get("segmentation") else None
        p.outputTable = scene.GetNodeByID(ids.get("table")) if ids.get("table") else None
        p.outputHeatmap = scene.GetNodeByID(ids.get("heatmap")) if ids.get("heatmap") else None
        self.ui.resultsTableView.setMRMLTableNode(p.outputTable)
        notes = findings.get("clinical_notes") or []
        self.ui.notesLabel.setText("\n".join("• " + n for n in notes))
        self.ui.notesLabel.setVisible(bool(notes))
        self.ui.resultsCollapsibleButton.collapsed = False
        self.logic.showInViews(p.inputVolume, p.outputHeatmap, p.heatmapOpacity, ids.get("focus_ras"))
        outputs = findings.get("outputs") or {}
        report = Path(findingsPath).parent / outputs["report"] if outputs.get("report") else None
        self._reportPath = report if report is not None and report.is_file() else None
        self.ui.showReportButton.setEnabled(self._reportPath is not None)

    def onShowReport(self) -> None:
        if self._reportPath is not None:
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(self._reportPath)))


#
# Logic
#
class BreastDLRLogic(ScriptedLoadableModuleLogic):
    """Runs the worker on a volume node and loads the results; GUI-free (the Test and scripts use it).

    ``processFactory(request, workDir)`` makes the worker process (tests pass a stand-in)."""

    def __init__(self, processFactory: Optional[Callable[..., Any]] = None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        from BreastDLRSlicerLib.process import WorkerProcess

        self.processFactory = processFactory or WorkerProcess
        self.lastResults: Optional[Dict[str, Any]] = None

    def getParameterNode(self):
        return BreastDLRParameterNode(super().getParameterNode())

    # models
    def userModelsDir(self) -> Path:
        from BreastDLRSlicerLib.models import user_models_dir

        return user_models_dir(os.path.dirname(slicer.app.slicerUserSettingsFilePath))

    def listBundles(self) -> List[Dict[str, Any]]:
        from BreastDLRLib.bundles import list_bundles

        return list_bundles(extra_dirs=[self.userModelsDir()])

    def importModel(self, folder: str, overwrite: bool = False) -> Path:
        from BreastDLRSlicerLib.models import import_bundle

        return import_bundle(folder, self.userModelsDir(), overwrite=overwrite)

    @staticmethod
    def modelPathsFor(modelPath: str) -> Optional[List[str]]:
        from BreastDLRSlicerLib.models import model_paths_for

        return model_paths_for(modelPath)

    # dependencies
    def ensureDependencies(self, ask: bool = True) -> bool:
        from BreastDLRSlicerLib.dependencies import ensure_dependencies

        return ensure_dependencies(Path(self.resourcePath("")), Path(slicer.app.temporaryPath), ask=ask)

    def resourcePath(self, relativePath: str) -> str:
        return os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", relativePath)

    # run
    def start(self, volumeNode, clinical: Optional[Dict[str, Any]] = None, birads: Optional[str] = None,
              modelPaths: Optional[List[str]] = None, device: str = "auto", spacing: Optional[float] = None,
              progressCallback: Optional[Callable[[str, float, str], None]] = None, outlineNode=None):
        """Export the volume (and the reader's outline segmentation, when given), start the worker; returns a
        ``WorkerMonitor`` (``poll``, ``wait``, ``cancel``)."""
        from BreastDLRLib import mrml
        from BreastDLRSlicerLib.process import WorkerMonitor

        if volumeNode is None:
            raise ValueError(_("Select an input volume."))
        self.ensureDependencies()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        workDir = Path(tempfile.mkdtemp(prefix=f"BreastDLR-{stamp}-", dir=slicer.app.temporaryPath))
        inputPath = mrml.export_volume_node(volumeNode, workDir / "input.nrrd")
        outlinePath, outlineSource = (mrml.export_outline(outlineNode, volumeNode, workDir / "outline.nrrd")
                                      if outlineNode else (None, None))
        request = {
            "input": str(inputPath),
            "out_dir": str(workDir / "results"),
            "clinical": clinical or None,
            "birads": None if birads in (None, "", "unknown") else birads,
            "model_paths": modelPaths,
            "device": device,
            "spacing": spacing,
            "outline": str(outlinePath) if outlinePath else None,
            "outline_source": outlineSource,
        }
        process = self.processFactory(request, workDir)
        process.start()
        return WorkerMonitor(process, progressCallback)

    def process(self, volumeNode, clinical: Optional[Dict[str, Any]] = None, birads: Optional[str] = None,
                modelPaths: Optional[List[str]] = None, device: str = "auto", wait: bool = True,
                progressCallback: Optional[Callable[[str, float, str], None]] = None, spacing: Optional[float] = None,
                outlineNode=None):
        """Analyse ``volumeNode`` (in the reader's ``outlineNode`` segments when given, else where the segmenter
        finds lesions).  With ``wait`` the results are loaded into the scene and the findings dict is returned
        (node IDs in ``self.lastResults``); without, the running ``WorkerMonitor`` is returned."""
        monitor = self.start(volumeNode, clinical, birads, modelPaths, device, spacing, progressCallback, outlineNode)
        if not wait:
            return monitor
        outcome = monitor.wait(idle=slicer.app.processEvents)
        return self.loadResults(outcome, volumeNode)

    def loadResults(self, outcome, referenceNode) -> Dict[str, Any]:
        """Put a finished run's results into the scene; raises RuntimeError with the worker's message."""
        from BreastDLRLib import mrml

        if not outcome.ok:
            raise RuntimeError(outcome.message)
        findings = json.loads(Path(outcome.findings).read_text(encoding="utf-8"))
        self.lastResults = mrml.add_findings_to_scene(slicer.mrmlScene, findings, Path(outcome.findings).parent, referenceNode)
        return findings

    # views
    def setHeatmapOpacity(self, heatmapNode, opacity: float) -> None:
        """Foreground opacity of the slice views that show ``heatmapNode`` as foreground."""
        for composite in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):
            if composite.GetForegroundVolumeID() == heatmapNode.GetID():
                composite.SetForegroundOpacity(opacity)

    def showInViews(self, volumeNode, heatmapNode, opacity: float, focusRas: Optional[List[float]]) -> None:
        slicer.util.setSliceViewerLayers(background=volumeNode, foreground=heatmapNode,
                                         foregroundOpacity=opacity if heatmapNode is not None else 0.0)
        if focusRas is not None:
            slicer.modules.markups.logic().JumpSlicesToLocation(*focusRas, True)
        else:
            slicer.util.resetSliceViews()


#
# Test
#
class BreastDLRTest(ScriptedLoadableModuleTest):
    """The whole workflow in Slicer on the bundled synthetic ABVS sample (loaded through Sample Data)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_BreastDLR_workflow()
        self.setUp()
        self.test_BreastDLR_reader_outline()

    def test_BreastDLR_workflow(self):
        import SampleData

        self.delayDisplay("Loading the synthetic ABVS sample")
        registerSampleData()
        volumeNode = SampleData.downloadSample("BreastDLR synthetic ABVS volume")
        self.assertIsNotNone(volumeNode)

        self.delayDisplay("Running BreastDLR (this can take a minute on a CPU)")
        logic = BreastDLRLogic()
        fractions = []
        findings = logic.process(volumeNode, clinical=None, birads="4a", wait=True,
                                 progressCallback=lambda stage, f, msg: fractions.append(f))
        ids = logic.lastResults
        self.assertTrue(fractions and all(0.0 <= f <= 1.0 for f in fractions))

        segmentation = slicer.mrmlScene.GetNodeByID(ids["segmentation"])
        self.assertGreaterEqual(segmentation.GetSegmentation().GetNumberOfSegments(), 1)
        self.assertEqual(segmentation.GetSegmentation().GetNumberOfSegments(), len(findings["lesions"]))
        table = slicer.mrmlScene.GetNodeByID(ids["table"])
        self.assertEqual(table.GetNumberOfRows(), len(findings["lesions"]))
        self.assertIsNotNone(ids["heatmap"])
        heatmapNode = slicer.mrmlScene.GetNodeByID(ids["heatmap"])
        heatmap = slicer.util.arrayFromVolume(heatmapNode)
        self.assertEqual(heatmap.shape, slicer.util.arrayFromVolume(volumeNode).shape)
        self.assertGreaterEqual(float(heatmap.min()), 0.0)
        self.assertLessEqual(float(heatmap.max()), 1.0)
        self.delayDisplay("Test passed")

    def test_BreastDLR_reader_outline(self):
        """The real 2D sample with its reader outline as a segmentation: the outline is the lesion, and the
        morphology models score it."""
        from BreastDLRSlicerLib.samples import samples_dir

        self.delayDisplay("Loading the real 2D sample and its outline")
        folder = samples_dir()
        self.assertIsNotNone(folder)
        volumeNode = slicer.util.loadVolume(str(folder / "breast_us_sample.png"), {"singleFile": True})
        labelNode = slicer.util.loadLabelVolume(str(folder / "breast_us_sample_mask.png"), {"singleFile": True})
        outlineNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my outline")
        slicer.modules.segmentations.logic().ImportLabelmapToSegmentationNode(labelNode, outlineNode)
        self.assertGreaterEqual(outlineNode.GetSegmentation().GetNumberOfSegments(), 1)

        self.delayDisplay("Running BreastDLR on the reader's outline")
        findings = BreastDLRLogic().process(volumeNode, birads="4a", wait=True, outlineNode=outlineNode)
        self.assertEqual(len(findings["lesions"]), 1)
        lesion = findings["lesions"][0]
        self.assertEqual(lesion["outline"], "reader")
        self.assertIn("malignancy_morphology", lesion["probabilities"])
        self.assertIn("high_risk_morphology", lesion["probabilities"])
        self.delayDisplay("Test passed")

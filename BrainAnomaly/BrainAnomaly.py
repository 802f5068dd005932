"""Brain Anomaly: unsupervised anomaly detection in brain MRI, as a 3D Slicer module.

The panel is thin. BrainAnomalySlicer.logic (no GUI) exports the input, runs the model in its own process and brings
the heatmap, label map, segmentation, lesion table and pseudo-healthy image into the scene; BrainAnomalySlicer.panel
holds the GUI-free helpers (slider scale, texts). Loading the module imports neither torch nor the inference library,
so it loads in a fresh Slicer; the Python packages inference needs are installed on the first detection.
"""

import dataclasses
import logging
import os
import sys
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

_HERE = os.path.dirname(os.path.abspath(__file__))
# Installed, BrainAnomalySlicer and BrainAnomalyLib sit beside this file (qt-scripted-modules); in the source tree
# BrainAnomalySlicer is beside it and BrainAnomalyLib one folder up.
for _folder in (_HERE, os.path.dirname(_HERE)):
    if _folder not in sys.path and any(os.path.isfile(os.path.join(_folder, package, "__init__.py"))
                                       for package in ("BrainAnomalySlicer", "BrainAnomalyLib")):
        sys.path.insert(0, _folder)

from BrainAnomalySlicer import panel  # noqa: E402  (pure Python: no Qt, no torch)

TITLE = "Brain Anomaly"


class BrainAnomaly(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = TITLE
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["BrainAnomaly developers"]
        self.parent.helpText = (
            "Unsupervised anomaly detection in brain MRI. A model of healthy brains flags what it cannot explain: "
            "a heatmap over the scan, a label map, a segmentation and a table of lesions (click a row to jump to it). "
            "The threshold slider is in healthy false-positive rate (how often healthy tissue would be flagged), "
            "mapped through the model's calibration; moving it re-thresholds without running the model again. "
            "Inference runs in a separate process and can be cancelled. Research use only, not for diagnosis.")
        self.parent.acknowledgementText = (
            "Uses the MNI152 2009a template shipped with nilearn, deepbet for skull stripping, SimpleITK for N4 and "
            "registration, and PyTorch (through the PyTorch extension). The shipped models were trained on the IXI "
            "data set (brain-development.org).")
        for resources in (os.path.join(_HERE, "Resources"), os.path.join(os.path.dirname(_HERE), "Resources")):
            icon = os.path.join(resources, "Icons", "BrainAnomaly.png")
            if os.path.isfile(icon):  # Slicer finds it itself when installed; the source tree keeps it one level up
                self.parent.icon = qt.QIcon(icon)
                break


@parameterNodeWrapper
class BrainAnomalyParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    model: str = ""  # registry id; the model selector is filled at run time, so it is synced by hand
    modality: str = ""
    device: Annotated[str, Choice(list(panel.DEVICE_CHOICES))] = "auto"
    skullStrip: bool = True
    biasCorrection: bool = True
    registration: bool = True
    perLesionSegments: bool = False
    createNewOutputs: bool = False
    fprLog10Percent: Annotated[float, WithinRange(panel.SLIDER_MIN, panel.SLIDER_MAX)] = 0.0
    minLesionMl: Annotated[float, WithinRange(0.0, 5.0)] = 0.05
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6


class BrainAnomalyWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None  # the DetectionRun in flight
        self._outputs = None  # OutputNodes shown in the Display section
        self._models = []
        self._defaultModel = None
        self._lastStep = None
        self._syncing = False  # widgets being set from state: no handler reacts
        self._dependenciesReady = False

    # -- set-up ---------------------------------------------------------------------------------------------------
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        from BrainAnomalySlicer.logic import resources_root

        uiWidget = slicer.util.loadUI(str(resources_root() / "UI" / "BrainAnomaly.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = BrainAnomalyLogic()

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(200)
        self._pollTimer.connect("timeout()", self._poll)
        self._thresholdTimer = qt.QTimer()  # label map and table follow the slider once it rests a moment
        self._thresholdTimer.setSingleShot(True)
        self._thresholdTimer.setInterval(150)
        self._thresholdTimer.connect("timeout()", self._applyThreshold)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.detectButton.connect("clicked(bool)", self.onDetectButton)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.modalitySelector.connect("currentTextChanged(QString)", self.onModalityChanged)
        self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputChanged)
        self.ui.fprSlider.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.minLesionSlider.connect("valueChanged(double)", self.onLesionOptionChanged)
        self.ui.perLesionCheckBox.connect("toggled(bool)", self.onLesionOptionChanged)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.lesionTableView.connect("clicked(QModelIndex)", self.onLesionClicked)

        self._refreshModels()
        self.initializeParameterNode()
        qt.QTimer.singleShot(0, self._showDevices)  # may import torch (seconds): after the panel is shown

    def cleanup(self):
        self._pollTimer.stop()
        self._thresholdTimer.stop()
        if self._run is not None:
            self._run.cancel()
            self._run.cleanup()
            self._run = None
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        # A detection in flight goes on (the poll timer belongs to the widget); only the GUI binding is dropped.
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None

    def onSceneStartClose(self, caller, event):
        if self._run is not None:
            self._run.cancel()  # its input is about to go
        self.setParameterNode(None)
        self._setOutputs(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if self._parameterNode.inputVolume is None:
            from BrainAnomalySlicer.nodes import ROLE_ATTRIBUTE

            for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
                if node.GetClassName() == "vtkMRMLScalarVolumeNode" and not node.GetAttribute(ROLE_ATTRIBUTE):
                    self._parameterNode.inputVolume = node
                    break

    def setParameterNode(self, parameterNode):
        if self._parameterNode is not None:
            if self._parameterNodeGuiTag is not None:
                self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
                self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = parameterNode
        if parameterNode is not None:
            self._syncing = True
            try:
                # Widgets with a "SlicerParameterName" property in the .ui are bound both ways.
                self._parameterNodeGuiTag = parameterNode.connectGui(self.ui)
                for i, choice in enumerate(panel.DEVICE_CHOICES):  # the connector lists the raw choices
                    self.ui.deviceSelector.setItemText(i, panel.DEVICE_LABELS[choice])
                self._selectModel(parameterNode.model)
            finally:
                self._syncing = False
            if self._currentModelId() != parameterNode.model or not parameterNode.modality:
                self.onModelChanged(self.ui.modelSelector.currentIndex)  # records the model, guesses the modality
            else:
                self.ui.modalitySelector.setCurrentText(parameterNode.modality)
            self.addObserver(parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self.onInputChanged()

    # -- inputs ---------------------------------------------------------------------------------------------------
    def _refreshModels(self, select=None):
        from BrainAnomalySlicer.logic import available_models
        from BrainAnomalyLib.store.models import default_model_name

        try:
            self._models, default = available_models(), default_model_name()
        except Exception as exc:  # an unreadable registry must not take the panel down
            self._models, default = [], None
            self._log(f"Cannot list the models: {exc}")
        combo = self.ui.modelSelector
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for i, entry in enumerate(self._models):
            combo.addItem(panel.model_item_text(entry, default), entry.get("id"))
            combo.setItemData(i, panel.model_details(entry), qt.Qt.ToolTipRole)
        combo.blockSignals(wasBlocked)
        self._syncing = True
        try:
            text = self.ui.modalitySelector.currentText
            self.ui.modalitySelector.clear()
            self.ui.modalitySelector.addItems(panel.modality_choices(self._models))
            self.ui.modalitySelector.setCurrentText(text)
        finally:
            self._syncing = False
        self._defaultModel = default
        self._selectModel(select or (self._parameterNode.model if self._parameterNode else None))
        if select:
            self.onModelChanged(self.ui.modelSelector.currentIndex)

    def _selectModel(self, modelId):
        combo = self.ui.modelSelector
        wasBlocked = combo.blockSignals(True)
        combo.currentIndex = panel.model_index(self._models, modelId, self._defaultModel)
        combo.blockSignals(wasBlocked)
        index = combo.currentIndex
        self.ui.modelDetailsLabel.text = panel.model_details(self._models[index] if index >= 0 else None)

    def _currentModelId(self):
        index = self.ui.modelSelector.currentIndex
        return self._models[index].get("id", "") if 0 <= index < len(self._models) else ""

    def onModelChanged(self, index):
        entry = self._models[index] if 0 <= index < len(self._models) else None
        self.ui.modelDetailsLabel.text = panel.model_details(entry)
        if self._syncing or self._parameterNode is None:
            return
        self._parameterNode.model = entry["id"] if entry else ""
        if panel.guess_modality(entry):
            self.ui.modalitySelector.setCurrentText(panel.guess_modality(entry))  # guessed; the user may edit it

    def onModalityChanged(self, text):
        if not self._syncing and self._parameterNode is not None:
            self._parameterNode.modality = text.strip()

    def _showDevices(self):
        self.ui.deviceInfoLabel.text = panel.describe_devices()

    def onImportModel(self):
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), "Import model: a .zip, or the model.json of a model folder", "",
            "Models (*.zip model.json);;All files (*)")
        if not path or not self._ensureDependencies():  # checking a model reads its tensors (safetensors)
            return
        from BrainAnomalyLib.core.errors import BrainAnomalyError
        from BrainAnomalyLib.store.model_store import import_model

        for overwrite in (False, True):
            qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
            try:
                target = import_model(panel.model_source(path), overwrite=overwrite)
                break
            except (BrainAnomalyError, OSError) as exc:
                error = exc
            finally:
                qt.QApplication.restoreOverrideCursor()
            if overwrite or not panel.is_already_installed(error) or not slicer.util.confirmYesNoDisplay(
                    "A model of this name is already installed. Replace it?", windowTitle=TITLE):
                slicer.util.errorDisplay(f"The model was not imported:\n\n{error}", windowTitle=TITLE)
                return
        self._log(f"Imported model '{target.name}' into {target.parent}")
        self._refreshModels(select=target.name)

    def _ensureDependencies(self):
        if self._dependenciesReady:
            return True
        try:
            from BrainAnomalySlicer.dependencies import ensure_dependencies, slicer_installers
        except ImportError:  # a tree without the installer: the environment is the user's business
            self._dependenciesReady = True
            return True
        torchInstaller, pipInstaller = slicer_installers()

        def progress(message):
            self._log(message)
            slicer.app.processEvents()

        try:
            ready = ensure_dependencies(progress=progress, confirm=lambda message: slicer.util.confirmOkCancelDisplay(
                message, windowTitle=TITLE), torch_installer=torchInstaller, pip_installer=pipInstaller)
        except Exception as exc:
            slicer.util.errorDisplay(f"The Python packages BrainAnomaly needs could not be installed:\n\n{exc}",
                                     windowTitle=TITLE)
            return False
        if ready:
            self._dependenciesReady = True
            self._showDevices()
        return ready

    # -- detection ------------------------------------------------------------------------------------------------
    def onDetectButton(self):
        if self._run is not None:
            self._log("Cancelling…")
            self.ui.detectButton.enabled = False
            self._run.cancel(wait=False)  # stops the whole process tree; the poll timer finishes and reports it
            return
        if self._parameterNode is None or not self._ensureDependencies():
            return
        p = self._parameterNode
        self._start(panel.detection_options(
            model=p.model, modality=p.modality, device=p.device, skull_strip=p.skullStrip,
            bias_correction=p.biasCorrection, registration=p.registration, fpr=panel.slider_to_fpr(p.fprLog10Percent),
            min_lesion_ml=p.minLesionMl, per_lesion=p.perLesionSegments, create_new=p.createNewOutputs))

    def _start(self, options):
        inputVolume = self._parameterNode.inputVolume
        self._lastStep = None
        self.ui.progressBar.value = 0
        self.ui.progressBar.format = "starting…"
        self._log(f"Detecting anomalies in '{inputVolume.GetName() if inputVolume else None}' with "
                  f"{options.model or 'the default model'} (device {options.device})")
        try:
            self._run = self.logic.start(inputVolume, options, on_event=self._onEvent)
        except Exception as exc:
            self._run = None
            self._failed(f"The detection could not start: {exc}")
            return
        self._pollTimer.start()
        self._updateButtons()

    def _onEvent(self, event):
        state = panel.progress_state(event)
        if state is not None:
            self.ui.progressBar.value, self.ui.progressBar.format = state
        line = panel.event_log_line(event, self._lastStep)
        if event.get("event") == "progress":
            self._lastStep = event.get("step")
        if line:
            self._log(line)

    def _poll(self):
        run = self._run
        try:
            if run is None or not run.poll():
                return
        except Exception as exc:  # e.g. the retry after GPU out-of-memory could not start
            self._pollTimer.stop()
            self._run = None
            run.cleanup()
            self._updateButtons()
            self._failed(f"The inference process could not be watched: {exc}")
            return
        self._pollTimer.stop()
        self._run = None
        try:
            self._finished(run)
        finally:
            self._updateButtons()

    def _finished(self, run):
        from BrainAnomalySlicer.logic import OutOfMemory

        if run.state == "done" and not slicer.mrmlScene.IsNodePresent(run.input_node):
            run.cleanup()
            self._log("The input volume was removed during the detection; its results were discarded.")
            return
        if run.state == "done":
            try:
                outputs = self.logic.finish(run)
            except Exception as exc:
                self._failed(f"The results could not be loaded: {exc}")
                return
            self.ui.progressBar.value, self.ui.progressBar.format = 100, "done"
            self._setOutputs(outputs, show=True)
            self._log("Outputs: " + ", ".join(node.GetName() for node in outputs.nodes().values()))
            self._log(f"Done: {self.ui.summaryLabel.text}")
            return
        if run.state == "cancelled":
            self.ui.progressBar.format = "cancelled"
            self._log("Cancelled; nothing was added to the scene.")
            return
        error = run.error
        if isinstance(error, OutOfMemory) and run.options.device != "cpu" and slicer.util.confirmYesNoDisplay(
                panel.OOM_QUESTION, windowTitle=TITLE):
            self._start(dataclasses.replace(run.options, device="cpu", batch_size=None))
            return
        self._failed(str(error), getattr(error, "details", ""))

    def _failed(self, message, details=""):
        self.ui.progressBar.format = "failed"
        self._log(f"Failed: {message}")
        extra = {"detailedText": details} if details else {}
        slicer.util.errorDisplay(f"Anomaly detection failed:\n\n{message}", windowTitle=TITLE, **extra)

    # -- outputs and display --------------------------------------------------------------------------------------
    def onInputChanged(self, node=None):
        # The selector, not the parameter node: this slot may run before the parameter node has heard of the change.
        inputVolume = self.ui.inputSelector.currentNode() if self._parameterNode is not None else None
        self._setOutputs(self.logic.outputs_for(inputVolume) if inputVolume is not None else None)
        self._updateButtons()

    def _setOutputs(self, outputs, show=False):
        """Point the Display section at a run's outputs (None: no results for this input)."""
        self._thresholdTimer.stop()
        self._outputs = outputs if outputs is not None and outputs.heatmap is not None else None
        state = self._state()
        self.ui.lesionTableView.setMRMLTableNode(self._outputs.table if state is not None else None)
        if state is None:
            self._outputs = None
            self.ui.summaryLabel.text = "no results yet"
            self.ui.thresholdLabel.text = panel.threshold_text(panel.slider_to_fpr(self.ui.fprSlider.value), None)
            return
        self._syncing = True
        try:
            self.ui.fprSlider.value = panel.fpr_to_slider(state.get("fpr"))
            self.ui.minLesionSlider.value = float(state.get("min_lesion_ml", self.ui.minLesionSlider.value))
            self.ui.perLesionCheckBox.checked = bool(state.get("per_lesion"))
        finally:
            self._syncing = False
        self.ui.thresholdLabel.text = panel.threshold_text(state.get("fpr"), state.get("threshold"),
                                                           state.get("curve") is not None)
        self.ui.summaryLabel.text = panel.state_summary(state)
        if show:
            self.logic.show(self.ui.inputSelector.currentNode(), self._outputs, self.ui.opacitySlider.value)

    def _state(self):
        """The calibration state of the outputs on show, after dropping nodes the user has deleted since."""
        if self._outputs is None:
            return None
        for role, node in self._outputs.nodes().items():
            if not slicer.mrmlScene.IsNodePresent(node):
                setattr(self._outputs, role, None)
        try:
            return self.logic.state(self._outputs) if self._outputs.heatmap is not None else None
        except Exception:
            return None

    def onThresholdChanged(self, value):
        fpr = panel.slider_to_fpr(value)
        if self._syncing:
            return
        state = self._state()
        if state is None:
            self.ui.thresholdLabel.text = panel.threshold_text(fpr, None)  # the FPR the next run starts at
            return
        score = self.logic.preview_threshold(self._outputs, fpr)  # display threshold now, label map on rest
        self.ui.thresholdLabel.text = panel.threshold_text(fpr, score, state.get("curve") is not None)
        self._thresholdTimer.start()

    def onLesionOptionChanged(self, *args):
        if not self._syncing and self._state() is not None:
            self._thresholdTimer.start()

    def _applyThreshold(self):
        if self._state() is None:
            return
        try:
            result = self.logic.apply_threshold(self._outputs, fpr=panel.slider_to_fpr(self.ui.fprSlider.value),
                                                min_lesion_ml=self.ui.minLesionSlider.value,
                                                per_lesion=self.ui.perLesionCheckBox.checked)
        except Exception as exc:
            self._log(f"Re-thresholding failed: {exc}")
            return
        self.ui.summaryLabel.text = panel.result_summary(result)

    def onOpacityChanged(self, value):
        if not self._syncing and self._state() is not None:
            self.logic.set_opacity(self._outputs, value)

    def onLesionClicked(self, index):
        if self._state() is None or self._outputs.table is None:
            return
        row = self.ui.lesionTableView.sortFilterProxyModel().mapToSource(index).row()
        self.logic.jump_to_lesion(self._outputs, row)

    # -- helpers --------------------------------------------------------------------------------------------------
    def _updateButtons(self, caller=None, event=None):
        running = self._run is not None
        ready = self._parameterNode is not None and self._parameterNode.inputVolume is not None and self._models
        self.ui.detectButton.text = "Cancel" if running else "Detect anomalies"
        self.ui.detectButton.enabled = running or bool(ready)
        self.ui.detectButton.toolTip = ("Stop the detection (nothing is added to the scene)" if running else
                                        "Run the model on the input volume" if ready else
                                        "Select an input volume (and import a model if none is listed)")
        for section in (self.ui.inputsCollapsibleButton, self.ui.preprocessingCollapsibleButton,
                        self.ui.outputsCollapsibleButton):
            section.enabled = not running

    def _log(self, message):
        logging.info(f"BrainAnomaly: {message}")
        self.ui.logTextEdit.appendPlainText(message)


class BrainAnomalyLogic(ScriptedLoadableModuleLogic):
    """BrainAnomalySlicer.logic.DetectionLogic on the application's scene (or the one given), for the widget, scripts
    and tests. Headless: it never opens a dialog. DetectionLogic's methods (start, finish, detect, state, calibration,
    apply_threshold, preview_threshold, show, set_opacity, jump_to_lesion, outputs_for) are called on it
    directly."""

    def __init__(self, scene=None):
        ScriptedLoadableModuleLogic.__init__(self)
        from BrainAnomalySlicer.logic import DetectionLogic  # SimpleITK and numpy: only once the module is used

        self.detection = DetectionLogic(scene if scene is not None else slicer.mrmlScene)

    def __getattr__(self, name):  # called only for names this class lacks
        if name.startswith("_") or "detection" not in self.__dict__:
            raise AttributeError(name)
        return getattr(self.detection, name)

    def getParameterNode(self):
        return BrainAnomalyParameterNode(super().getParameterNode())


class BrainAnomalyTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer: the shipped default model on a synthetic scan with a known lesion, through the logic."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_detection_on_demo_case()

    def test_detection_on_demo_case(self):
        import numpy as np
        import SimpleITK as sitk

        from BrainAnomalySlicer import nodes
        from BrainAnomalySlicer.dependencies import ensure_dependencies, slicer_installers
        from BrainAnomalySlicer.logic import DetectionOptions

        self.delayDisplay("Checking Python packages (installed on first use)")
        self.assertTrue(ensure_dependencies(logging.info, None, *slicer_installers()))
        from BrainAnomalyLib.synth.demo import make_demo_case

        scan, truth = make_demo_case()
        volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "BrainAnomalyDemo")
        nodes.update_node_from_image(volume, scan)
        # A user's node with an output's name: never to be touched.
        users = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", nodes.output_name(volume, "heatmap"))
        logic = BrainAnomalyLogic()

        self.delayDisplay("Detecting with the shipped default model")
        outputs = logic.detect(volume, DetectionOptions())
        self.assertNotEqual(outputs.heatmap.GetID(), users.GetID())
        self.assertIsNone(users.GetImageData())
        self.assertEqual(outputs.heatmap.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions())
        a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        outputs.heatmap.GetIJKToRASMatrix(a)
        volume.GetIJKToRASMatrix(b)
        self.assertTrue(all(abs(a.GetElement(r, c) - b.GetElement(r, c)) < 1e-4 for r in range(4) for c in range(4)))
        labels = nodes.node_array(outputs.labelmap) > 0
        self.assertTrue(labels.any(), "the label map is empty")
        self.assertTrue((labels & (sitk.GetArrayFromImage(truth) > 0)).any(), "no flagged voxel is in the lesion")
        self.assertGreater(outputs.table.GetNumberOfRows(), 0)
        self.assertGreater(outputs.segmentation.GetSegmentation().GetNumberOfSegments(), 0)

        self.delayDisplay("Re-thresholding without running the model")
        heat = nodes.node_array(outputs.heatmap).copy()
        logic.detection.start = lambda *args, **kwargs: self.fail("re-thresholding started a model run")
        try:
            counts = []
            for fpr in (0.001, 0.1):
                logic.apply_threshold(outputs, fpr=fpr)
                counts.append(int((nodes.node_array(outputs.labelmap) > 0).sum()))
                self.assertAlmostEqual(logic.state(outputs)["fpr"], fpr)
        finally:
            del logic.detection.start
        self.assertLess(counts[0], counts[1], "a stricter FPR should flag fewer voxels")
        self.assertTrue(np.array_equal(heat, nodes.node_array(outputs.heatmap)))

        self.delayDisplay("Running again: the outputs are reused, or new ones made on request")
        ids = {role: node.GetID() for role, node in outputs.nodes().items()}
        again = logic.detect(volume, DetectionOptions())
        self.assertEqual({role: node.GetID() for role, node in again.nodes().items()}, ids)
        fresh = logic.detect(volume, DetectionOptions(reuse_outputs=False))
        self.assertTrue(all(node.GetID() != ids[role] for role, node in fresh.nodes().items()))
        self.assertTrue(all(slicer.mrmlScene.GetNodeByID(i) is not None for i in ids.values()))
        self.delayDisplay("Test passed")

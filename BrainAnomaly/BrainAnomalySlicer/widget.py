"""The Brain Anomaly panel: Qt wiring only. What it shows comes from BrainAnomalySlicer.panel (GUI-free, tested
under pytest); what it does goes through BrainAnomalyLogic (DetectionLogic on Slicer's scene). Imported when the
module is first opened, never at Slicer start-up; torch is never imported here (the worker is asked which devices
exist)."""

import logging
from pathlib import Path
from typing import Annotated

import qt
import vtk

import slicer
from slicer import vtkMRMLScalarVolumeNode
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic
from slicer.util import VTKObservationMixin

from . import nodes, panel
from .logic import DetectionError, DetectionLogic, available_models, resources_root

TITLE = "Brain Anomaly"


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
    falseFindingsLog10: Annotated[float, WithinRange(panel.FINDINGS_SLIDER_MIN, panel.FINDINGS_SLIDER_MAX)] = \
        panel.false_findings_to_slider(panel.DEFAULT_FALSE_FINDINGS)
    voxelThreshold: bool = False  # the slider in healthy voxel FPR even where findings are calibrated
    fprLog10Percent: Annotated[float, WithinRange(panel.SLIDER_MIN, panel.SLIDER_MAX)] = 0.0
    minLesionMl: Annotated[float, WithinRange(0.0, 5.0)] = 0.05
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.6


class BrainAnomalyLogic(ScriptedLoadableModuleLogic, DetectionLogic):
    """DetectionLogic on the application's scene (or the one given), with the module's parameter node: what the
    widget, `slicer.util.getModuleLogic("BrainAnomaly")`, scripts and the self-test use. Headless: it never opens
    a dialog."""

    def __init__(self, scene=None, process_factory=None):
        ScriptedLoadableModuleLogic.__init__(self)
        DetectionLogic.__init__(self, scene if scene is not None else slicer.mrmlScene,
                                process_factory=process_factory)

    def getParameterNode(self):
        return BrainAnomalyParameterNode(super().getParameterNode())


class BrainAnomalyWidgetBody(VTKObservationMixin):
    """The panel inside the module's widget (BrainAnomaly.py keeps only the shell Slicer instantiates)."""

    def __init__(self, layout, isEntered):
        VTKObservationMixin.__init__(self)
        self.layout = layout
        self._isEntered = isEntered
        self.logic = None
        self._parameterNode = None
        self._binding = panel.GuiBinding()
        self._run = None  # the DetectionRun in flight
        self._outputs = None  # OutputNodes shown in the Display section
        self._models = []
        self._defaultModel = None
        self._lastStep = None
        self._syncing = False  # widgets being set from state: no handler reacts
        self._dependenciesReady = False
        self._installing = False
        self._devices = None  # the worker's answer to --list-devices, while it is on its way

    # -- set-up ---------------------------------------------------------------------------------------------------
    def setup(self):
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
        self._deviceTimer = qt.QTimer()
        self._deviceTimer.setInterval(250)
        self._deviceTimer.connect("timeout()", self._pollDevices)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self._hideOutputsFromInput)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self._hideOutputsFromInput)
        self.ui.detectButton.connect("clicked(bool)", self.onDetectButton)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.modalitySelector.connect("currentTextChanged(QString)", self.onModalityChanged)
        self.ui.inputSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onInputChanged)
        self.ui.fprSlider.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.findingsSlider.connect("valueChanged(double)", self.onThresholdChanged)
        self.ui.voxelThresholdCheckBox.connect("toggled(bool)", self.onUnitChanged)
        self.ui.minLesionSlider.connect("valueChanged(double)", self.onLesionOptionChanged)
        self.ui.perLesionCheckBox.connect("toggled(bool)", self.onLesionOptionChanged)
        self.ui.opacitySlider.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.lesionTableView.connect("clicked(QModelIndex)", self.onLesionClicked)
        self.ui.exportDicomButton.connect("clicked(bool)", self.onExportDicom)

        self._otherSelectors = {}  # a fusion model's other contrasts: modality -> (label, volume selector)
        self._refreshModels()
        self.initializeParameterNode()
        self._hideOutputsFromInput()
        self._queryDevices()

    def cleanup(self):
        self._pollTimer.stop()
        self._thresholdTimer.stop()
        self._deviceTimer.stop()
        self._binding.unbind()
        if self._run is not None:
            self._run.cancel()
            self._run.cleanup()
            self._run = None
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        # A detection in flight goes on (the poll timer belongs to the widget); only the GUI binding is dropped.
        self._binding.unbind()

    def onSceneStartClose(self, caller, event):
        if self._run is not None:
            self._run.cancel()  # its input is about to go
        self.setParameterNode(None)
        self._setOutputs(None)

    def onSceneEndClose(self, caller, event):
        if self._isEntered():
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if self._parameterNode.inputVolume is None or self.logic.is_output(self._parameterNode.inputVolume):
            self._parameterNode.inputVolume = None
            for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode"):
                if node.GetClassName() == "vtkMRMLScalarVolumeNode" and not self.logic.is_output(node):
                    self._parameterNode.inputVolume = node
                    break

    def setParameterNode(self, parameterNode):
        self._binding.unbind()
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = parameterNode
        if parameterNode is not None:
            self._syncing = True
            try:
                # Widgets with a "SlicerParameterName" property in the .ui are bound both ways, once.
                self._binding.bind(parameterNode, vars(self.ui).values())
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
        self._showOtherSelectors(panel.other_contrasts(entry))

    def _showOtherSelectors(self, modalities):
        """One volume selector per other contrast of a fusion model, under the input volume's."""
        layout = self.ui.inputsCollapsibleButton.layout()
        for modality in list(self._otherSelectors):
            if modality not in modalities:
                label, selector = self._otherSelectors.pop(modality)
                layout.removeWidget(label)
                layout.removeWidget(selector)
                label.deleteLater()
                selector.deleteLater()
        for n, modality in enumerate(modalities):
            if modality in self._otherSelectors:
                continue
            selector = slicer.qMRMLNodeComboBox()
            selector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
            selector.noneEnabled = True
            selector.addEnabled = False
            selector.removeEnabled = False
            selector.setMRMLScene(slicer.mrmlScene)
            selector.setCurrentNode(None)
            selector.toolTip = f"The {modality} volume of the same session (optional where the model says so)"
            label = qt.QLabel(f"{modality} volume:")
            layout.insertRow(1 + n, label, selector)
            self._otherSelectors[modality] = (label, selector)

    def onModalityChanged(self, text):
        if not self._syncing and self._parameterNode is not None:
            self._parameterNode.modality = text.strip()

    def _queryDevices(self):
        """Ask the worker which devices PyTorch sees; the answer is shown when it comes (the GUI never waits)."""
        self._deviceTimer.stop()
        self._devices = None
        self.ui.deviceInfoLabel.text = panel.describe_devices(None)
        try:
            self._devices = self.logic.query_devices()
        except Exception as exc:
            self.ui.deviceInfoLabel.text = panel.describe_devices({"error": str(exc)})
            return
        self._deviceTimer.start()

    def _pollDevices(self):
        answer = self._devices.poll() if self._devices is not None else {"error": "not asked"}
        if answer is not None:
            self._deviceTimer.stop()
            self._devices = None
            self.ui.deviceInfoLabel.text = panel.describe_devices(answer)

    def _hideOutputsFromInput(self, caller=None, event=None):
        # Deferred: a node is added before the logic gives it its role attribute.
        qt.QTimer.singleShot(0, self._updateHiddenInputs)

    def _updateHiddenInputs(self):
        self.ui.inputSelector.sortFilterProxyModel().hiddenNodeIDs = nodes.output_volume_ids(slicer.mrmlScene)

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
        if self._installing:  # a click that arrived while the installer pumps events
            return False
        from .dependencies import ensure_dependencies, slicer_installers

        torchInstaller, pipInstaller = slicer_installers()

        def progress(message):
            self._log(message)
            slicer.app.processEvents()

        # The installer pumps events (progress, its own dialogs): Detect and Import stay disabled meanwhile, so a
        # second click cannot start a second, nested install.
        self._installing = True
        self._updateButtons()
        try:
            ready = ensure_dependencies(progress=progress, confirm=lambda message: slicer.util.confirmOkCancelDisplay(
                message, windowTitle=TITLE), torch_installer=torchInstaller, pip_installer=pipInstaller)
        except Exception as exc:
            slicer.util.errorDisplay(f"The Python packages BrainAnomaly needs could not be installed:\n\n{exc}",
                                     windowTitle=TITLE)
            return False
        finally:
            self._installing = False
            self._updateButtons()
        if ready:
            self._dependenciesReady = True
            self._queryDevices()
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
        index = self.ui.modelSelector.currentIndex
        entry = self._models[index] if 0 <= index < len(self._models) else None
        self._start(panel.detection_options(
            model=p.model, modality=p.modality, device=p.device, skull_strip=p.skullStrip,
            bias_correction=p.biasCorrection, registration=p.registration, fpr=panel.slider_to_fpr(p.fprLog10Percent),
            false_findings=panel.slider_to_false_findings(p.falseFindingsLog10), voxel_threshold=p.voxelThreshold,
            finding_calibrated=panel.model_has_finding_calibration(entry), min_lesion_ml=p.minLesionMl,
            per_lesion=p.perLesionSegments, create_new=p.createNewOutputs))

    def _start(self, options):
        inputVolume = self._parameterNode.inputVolume
        self._lastStep = None
        self.ui.progressBar.value = 0
        self.ui.progressBar.format = "starting…"
        self._log(f"Detecting anomalies in '{inputVolume.GetName() if inputVolume else None}' with "
                  f"{options.model or 'the default model'} (device {options.device})")
        try:
            others = {m: sel.currentNode() for m, (_, sel) in self._otherSelectors.items() if sel.currentNode()}
            self._run = self.logic.start(inputVolume, options, on_event=self._onEvent, others=others or None)
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
        except Exception as exc:
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
            self._hideOutputsFromInput()
            # Shown over the scan the run was started on, and selected again if the user moved on meanwhile.
            self.ui.inputSelector.setCurrentNode(run.input_node)
            self._setOutputs(outputs)
            self.logic.show(run.input_node, outputs, self.ui.opacitySlider.value)
            self._log("Outputs: " + ", ".join(node.GetName() for node in outputs.nodes().values()))
            for line in panel.run_notes(self.logic.state(outputs)):
                self._log(line)
            self._log(f"Done: {self.ui.summaryLabel.text}")
            return
        if run.state == "cancelled":
            self.ui.progressBar.format = "cancelled"
            self._log("Cancelled; nothing was added to the scene.")
            return
        self._failed(str(run.error), getattr(run.error, "details", ""))

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

    def _setOutputs(self, outputs):
        """Point the Display section at a run's outputs (None: no results for this input)."""
        self._thresholdTimer.stop()
        self._outputs = outputs if outputs is not None and outputs.heatmap is not None else None
        state = self._state()
        self.ui.lesionTableView.setMRMLTableNode(self._outputs.table if state is not None else None)
        if state is None:
            self._outputs = None
            self.ui.summaryLabel.text = "no results yet"
            self._showThresholdText(None)
            return
        self._syncing = True
        try:
            if state.get("false_findings") is not None:
                self.ui.findingsSlider.value = panel.false_findings_to_slider(state["false_findings"])
            else:
                self.ui.fprSlider.value = panel.fpr_to_slider(state.get("fpr"))
            if panel.threshold_unit(state, False) == panel.FINDINGS:
                # Outputs that could be in findings show the unit they were made in (e.g. a run at a voxel FPR).
                self.ui.voxelThresholdCheckBox.checked = state.get("false_findings") is None
            self.ui.minLesionSlider.value = float(state.get("min_lesion_ml", self.ui.minLesionSlider.value))
            self.ui.perLesionCheckBox.checked = bool(state.get("per_lesion"))
        finally:
            self._syncing = False
        self._showThresholdText(state)
        self.ui.summaryLabel.text = panel.state_summary(state)

    def _unit(self, state):
        return panel.threshold_unit(state, self.ui.voxelThresholdCheckBox.checked)

    def _showThresholdText(self, state, score=None):
        """The slider of the unit in force and the text beside it (state None: what the next run starts at; a
        `score`: the slider is being dragged)."""
        unit = self._unit(state)
        self.ui.findingsSlider.visible = unit == panel.FINDINGS
        self.ui.fprSlider.visible = unit == panel.VOXEL
        if unit == panel.FINDINGS:
            current = state is not None and score is None and state.get("false_findings") is not None
            self.ui.thresholdLabel.text = panel.findings_text(
                panel.slider_to_false_findings(self.ui.findingsSlider.value),
                state.get("n_lesions") if current else None, score)
        elif state is None:
            self.ui.thresholdLabel.text = panel.threshold_text(panel.slider_to_fpr(self.ui.fprSlider.value), None)
        else:
            self.ui.thresholdLabel.text = panel.threshold_text(
                panel.slider_to_fpr(self.ui.fprSlider.value), state.get("threshold") if score is None else score,
                state.get("curve") is not None)

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
        if self._syncing:
            return
        state = self._state()
        if state is None:
            self._showThresholdText(None)  # what the next run starts at
            return
        # The display threshold (or the finding score needed) now, label map and table once the slider rests.
        if self._unit(state) == panel.FINDINGS:
            score = self.logic.preview_threshold(
                self._outputs, false_findings=panel.slider_to_false_findings(self.ui.findingsSlider.value))
        else:
            score = self.logic.preview_threshold(self._outputs, panel.slider_to_fpr(self.ui.fprSlider.value))
        self._showThresholdText(state, score)
        self._thresholdTimer.start()

    def onUnitChanged(self, checked):
        if self._syncing:
            return
        state = self._state()
        self._showThresholdText(state)
        if state is not None:
            self._applyThreshold()

    def onLesionOptionChanged(self, *args):
        if not self._syncing and self._state() is not None:
            self._thresholdTimer.start()

    def _applyThreshold(self):
        state = self._state()
        if state is None:
            return
        if self._unit(state) == panel.FINDINGS:
            point = {"false_findings": panel.slider_to_false_findings(self.ui.findingsSlider.value)}
        else:
            point = {"fpr": panel.slider_to_fpr(self.ui.fprSlider.value)}
        try:
            result = self.logic.apply_threshold(self._outputs, min_lesion_ml=self.ui.minLesionSlider.value,
                                                per_lesion=self.ui.perLesionCheckBox.checked, **point)
        except Exception as exc:
            self._log(f"Re-thresholding failed: {exc}")
            return
        self._showThresholdText(self._state())
        self.ui.summaryLabel.text = panel.result_summary(result)

    def onOpacityChanged(self, value):
        if not self._syncing and self._state() is not None:
            self.logic.set_opacity(self._outputs, value)

    def onLesionClicked(self, index):
        if self._state() is None or self._outputs.table is None:
            return
        row = self.ui.lesionTableView.sortFilterProxyModel().mapToSource(index).row()
        self.logic.jump_to_lesion(self._outputs, row)

    def onExportDicom(self):
        if self._state() is None or not self._ensureDependencies():  # highdicom comes with inference's packages
            return
        window = slicer.util.mainWindow()
        source = qt.QFileDialog.getExistingDirectory(
            window, "The DICOM series folder the scan was loaded from", self._dicomFolder())
        if not source:
            return
        target = qt.QFileDialog.getExistingDirectory(
            window, "A new or empty folder for the DICOM SEG and parametric map", "")
        if not target:
            return
        qt.QApplication.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            paths = self.logic.export_dicom(self._outputs, source, target)
        except DetectionError as exc:
            slicer.util.errorDisplay(f"Nothing was exported:\n\n{exc}", windowTitle=TITLE)
            return
        finally:
            qt.QApplication.restoreOverrideCursor()
        self._log(f"Exported the findings ({paths[0].name}) and the anomaly map ({paths[1].name}) to {target}")

    def _dicomFolder(self):
        """Where the input's images are, when it was loaded through Slicer's DICOM database; else empty."""
        node = self.ui.inputSelector.currentNode()
        uids = (node.GetAttribute("DICOM.instanceUIDs") or "").split() if node is not None else []
        database = getattr(slicer, "dicomDatabase", None)
        path = database.fileForInstance(uids[0]) if uids and database is not None else ""
        return str(Path(path).parent) if path else ""

    # -- helpers --------------------------------------------------------------------------------------------------
    def _updateButtons(self, caller=None, event=None):
        running = self._run is not None
        ready = self._parameterNode is not None and self._parameterNode.inputVolume is not None and self._models
        self.ui.detectButton.text = "Cancel" if running else "Detect anomalies"
        self.ui.detectButton.enabled = not self._installing and (running or bool(ready))
        self.ui.importModelButton.enabled = not self._installing and not running
        self.ui.detectButton.toolTip = ("Stop the detection (nothing is added to the scene)" if running else
                                        "Run the model on the input volume" if ready else
                                        "Select an input volume (and import a model if none is listed)")
        self.ui.exportDicomButton.enabled = not running and self._outputs is not None
        for section in (self.ui.inputsCollapsibleButton, self.ui.preprocessingCollapsibleButton,
                        self.ui.outputsCollapsibleButton):
            section.enabled = not running

    def _log(self, message):
        logging.info(f"BrainAnomaly: {message}")
        self.ui.logTextEdit.appendPlainText(message)

"""What the viewer does to its MRML scene, without any web framework: load a scan, run a detection in the module's
worker process (progress, cancel), move the operating point, opacity and minimum size, list and jump to lesions,
save the outputs, export them to DICOM and load a DICOM SEG back as a label map. Every change to nodes goes
through the Slicer module's own logic and node code, so the browser shows exactly what the module would make.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional

from BrainAnomalySlicer import nodes, panel
from BrainAnomalySlicer.logic import DetectionError, DetectionLogic, DetectionRun, available_models

# The viewer's own output files: the module's nodes as they stand (threshold, minimum size chosen in the browser).
SAVED_FILES = ("anomaly_map.nrrd", "pred_mask.nrrd", "lesions.csv")


class ViewerSession:
    """One scan at a time on `scene`, with the outputs of its latest detection."""

    def __init__(self, scene, python: Optional[str] = None, process_factory=None) -> None:
        self.scene = scene
        self.logic = DetectionLogic(scene, python, process_factory)
        self.input_node = None
        # The DICOM series folder the scan was read from: what DICOM export references and a SEG must segment.
        self.dicom_folder: Optional[Path] = None
        self.loaded_segmentations: List[object] = []
        self.outputs: Optional[nodes.OutputNodes] = None
        self.run: Optional[DetectionRun] = None
        self.opacity = 0.6
        self.lesions: List[dict] = []

    # -- input --
    def load(self, path) -> object:
        """Read a volume file or a DICOM series folder (BrainAnomalyLib's reader: BadInputError on anything it
        cannot use) into a new input node; the previous scan and its outputs leave the scene."""
        from BrainAnomalyLib.core.io import read_volume

        if self.running:
            raise DetectionError("a detection is running; cancel it first", kind="BadInputError")
        path = Path(str(path).strip()).expanduser()
        image = read_volume(path)
        self.clear()
        name = path.name.split(".")[0] or "scan"
        with nodes.transaction(self.scene) as tx:
            node = tx.add("vtkMRMLScalarVolumeNode", name)
            nodes.update_node_from_image(node, image)
            _grey_display(node)
        self.input_node = node
        self.dicom_folder = path.absolute() if path.is_dir() else None
        return node

    def clear(self) -> None:
        """Remove the scan and every output node made from it."""
        if self.input_node is not None:
            for node in self.logic.outputs_for(self.input_node).nodes().values():
                nodes.remove_node(self.scene, node)
            for node in self.loaded_segmentations:
                nodes.remove_node(self.scene, node)
            nodes.remove_node(self.scene, self.input_node)
        self.input_node, self.outputs, self.lesions = None, None, []
        self.dicom_folder, self.loaded_segmentations = None, []

    # -- models --
    @staticmethod
    def models() -> List[dict]:
        """Registry entries usable on one scan (a fusion model needs several contrasts, which the viewer does
        not load), each with the selector's text and its description."""
        from BrainAnomalyLib.store.models import default_model_name

        default = default_model_name()
        out = []
        for entry in available_models():
            if panel.other_contrasts(entry):
                continue
            out.append({"id": entry["id"], "title": panel.model_item_text(entry, default),
                        "details": panel.model_details(entry), "default": entry["id"] == default})
        return out

    # -- detection --
    @property
    def running(self) -> bool:
        return self.run is not None and self.run.state == "running"

    def start(self, model: Optional[str], on_event: Optional[Callable[[dict], None]] = None,
              bias_correction: bool = True, skull_strip: bool = True, registration: bool = True,
              min_lesion_ml: float = 0.05) -> DetectionRun:
        if self.running:
            raise DetectionError("a detection is already running", kind="BadInputError")
        entry = next((e for e in available_models() if e["id"] == model), None)
        options = panel.detection_options(
            model=model, modality=None, device="auto", skull_strip=skull_strip, bias_correction=bias_correction,
            registration=registration, finding_calibrated=panel.model_has_finding_calibration(entry) if entry else True,
            min_lesion_ml=min_lesion_ml)
        self.run = self.logic.start(self.input_node, options, on_event)
        return self.run

    def poll(self) -> Optional[str]:
        """None while the run goes on; then its end state ('done', 'failed', 'cancelled'), the outputs in the
        scene and shown when done. A failure raises the run's DetectionError (its outputs never reach the
        scene)."""
        run = self.run
        if run is None or not run.poll():
            return None
        self.run = None
        if run.state == "done":
            self.outputs = self.logic.finish(run)
            self.logic.show(run.input_node, self.outputs, self.opacity)
            self.lesions = self.logic.apply_threshold(self.outputs)["lesions"]
            return "done"
        run.cleanup()
        if run.state == "cancelled":
            return "cancelled"
        raise run.error

    def cancel(self) -> None:
        """Ask the worker's process tree to stop; `poll` reports 'cancelled' once it has."""
        if self.running:
            self.run.cancel(wait=False)

    def close(self) -> None:
        """Stop a run still going (its whole process tree, waiting for it) and remove its temporary folder: the
        viewer is shutting down."""
        run, self.run = self.run, None
        if run is not None:
            run.cancel(wait=True)
            run.cleanup()

    # -- the outputs in the scene --
    def state(self) -> Optional[dict]:
        return self.logic.state(self.outputs) if self.outputs is not None else None

    def threshold_unit(self) -> str:
        return panel.threshold_unit(self.state(), voxel_threshold=False)

    def slider_position(self) -> float:
        """Where the threshold slider stands for the operating point in force (log10 of its unit)."""
        state = self.state() or {}
        if self.threshold_unit() == panel.FINDINGS:
            return panel.false_findings_to_slider(state.get("false_findings"))
        return panel.fpr_to_slider(state.get("fpr"))

    def set_threshold(self, position: float) -> dict:
        """Re-threshold at a slider position: false findings per healthy scan when the result is calibrated for
        findings, else the healthy voxel FPR (the module's two scales)."""
        if self.threshold_unit() == panel.FINDINGS:
            result = self.logic.apply_threshold(self.outputs,
                                                false_findings=panel.slider_to_false_findings(position))
        else:
            result = self.logic.apply_threshold(self.outputs, fpr=panel.slider_to_fpr(position))
        self.lesions = result["lesions"]
        return result

    def threshold_text(self) -> str:
        state = self.state()
        if state is None:
            return ""
        if self.threshold_unit() == panel.FINDINGS:
            return panel.findings_text(state.get("false_findings"), state.get("n_lesions"))
        return panel.threshold_text(state.get("fpr"), state.get("threshold"), state.get("curve") is not None)

    def set_min_size(self, min_lesion_ml: float) -> dict:
        result = self.logic.apply_threshold(self.outputs, min_lesion_ml=float(min_lesion_ml))
        self.lesions = result["lesions"]
        return result

    def set_opacity(self, opacity: float) -> None:
        self.opacity = float(opacity)
        if self.outputs is not None:
            self.logic.set_opacity(self.outputs, self.opacity)

    def lesion_rows(self) -> List[dict]:
        """The lesion table node's rows (what the module's table shows), for the page's table."""
        if self.outputs is None or self.outputs.table is None:
            return []
        t = self.outputs.table.GetTable()
        names = [t.GetColumnName(c) for c in range(t.GetNumberOfColumns())]
        return [{name: t.GetValueByName(r, name).ToDouble() for name in names} for r in range(t.GetNumberOfRows())]

    def jump_to_lesion(self, row: int) -> Optional[List[float]]:
        return self.logic.jump_to_lesion(self.outputs, int(row)) if self.outputs is not None else None

    # -- saving --
    def save(self, folder) -> Path:
        """The anomaly map, the label map and the lesion table as they stand, into a new or empty folder (nothing
        is overwritten; the files appear together or not at all)."""
        import SimpleITK as sitk

        from BrainAnomalyLib.core.errors import BadInputError
        from BrainAnomalyLib.core.files import staged_folder
        from BrainAnomalyLib.detection.writers import write_lesions_csv

        if self.outputs is None:
            raise BadInputError("nothing to save yet: run a detection first")
        folder = Path(str(folder).strip()).expanduser().absolute()
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise BadInputError(f"{folder} is not a new or empty folder; choose another")
        with staged_folder(folder) as stage:
            sitk.WriteImage(nodes.node_to_image(self.outputs.heatmap), str(stage / SAVED_FILES[0]), True)
            sitk.WriteImage(nodes.node_to_image(self.outputs.labelmap), str(stage / SAVED_FILES[1]), True)
            write_lesions_csv(self.lesions, stage / SAVED_FILES[2])
        return folder

    # -- DICOM --
    def _dicom_source(self, action: str) -> Path:
        from BrainAnomalyLib.core.errors import BadInputError

        if self.input_node is None:
            raise BadInputError(f"load a scan from its DICOM folder first: {action} needs it")
        if self.dicom_folder is None:
            raise BadInputError(f"the scan is from a volume file, not a DICOM series folder: {action} needs the "
                                "scan read from its DICOM folder")
        return self.dicom_folder

    def export_dicom(self, folder, per_lesion: Optional[bool] = None) -> List[Path]:
        """The findings shown as a DICOM SEG and the anomaly map as a DICOM Parametric Map, referencing the DICOM
        series the scan was loaded from (the module's export, into a new or empty folder). Returns their paths."""
        from BrainAnomalyLib.core.errors import BadInputError

        if self.outputs is None:
            raise BadInputError("nothing to export yet: run a detection first")
        source = self._dicom_source("DICOM export")
        if not str(folder).strip():
            raise BadInputError("give a new or empty folder to export the DICOM files into")
        folder = Path(str(folder).strip()).expanduser()
        return self.logic.export_dicom(self.outputs, source, folder, per_lesion=per_lesion)

    def load_segmentation(self, path) -> object:
        """A DICOM SEG of the open series as a label map node on the scan's grid, each voxel its segment's
        number (a SEG exported here: the finding's number in the lesion table), shown over the scan."""
        import SimpleITK as sitk

        from BrainAnomalyLib.core.dicom import read_segmentation
        from BrainAnomalyLib.core.errors import BadInputError

        source = self._dicom_source("loading a DICOM SEG")
        path = Path(str(path).strip()).expanduser()
        if not path.is_file():
            raise BadInputError(f"DICOM SEG file not found: {path}")
        try:
            grid = nodes.node_to_image(self.input_node)
        except nodes.NodeError as exc:
            raise BadInputError(str(exc)) from None
        labels = read_segmentation(path, source, grid)
        with nodes.transaction(self.scene) as tx:
            node = tx.add("vtkMRMLLabelMapVolumeNode", path.name.split(".")[0] or "segmentation")
            nodes.update_labelmap(self.scene, node, sitk.GetArrayFromImage(labels),
                                  nodes.node_geometry(self.input_node))
        self.loaded_segmentations.append(node)
        nodes.show_label_layer(self.scene, node)
        return node

    def output_node_names(self) -> List[str]:
        """Every node in the scene that the module's code made (role attribute), whatever its input."""
        found = []
        for i in range(self.scene.GetNumberOfNodes()):
            node = self.scene.GetNthNode(i)
            if node.GetAttribute(nodes.ROLE_ATTRIBUTE):
                found.append(node.GetName())
        return found


def _grey_display(node) -> None:
    """Grey levels over the scan's 1st..99th percentile: Slicer's volume loading sets a scan's display, a bare
    MRML scene leaves it black."""
    import numpy as np

    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    lo, hi = (float(v) for v in np.percentile(nodes.node_array(node), (1.0, 99.0)))
    display.SetAutoWindowLevel(0)
    display.SetWindowLevelMinMax(lo, hi if hi > lo else lo + 1.0)

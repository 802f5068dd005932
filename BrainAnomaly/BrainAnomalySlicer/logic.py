"""Detection for the BrainAnomaly module without any GUI: export the input, run the worker process, bring its
outputs into the scene, and re-threshold them on demand. The widget, the batch script and the tests all drive
this one class; it never opens a dialog.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np
import SimpleITK as sitk

from . import nodes
from .process import InferenceProcess, python_executable

EventFn = Callable[[dict], None]
# Makes the object that runs one worker command: (command, env, cwd) -> an unstarted process with InferenceProcess's
# methods. Tests inject their own to stand in for the worker.
ProcessFactory = Callable[[List[str], Dict[str, str], str], InferenceProcess]


class DetectionError(RuntimeError):
    """The worker failed; `kind` says how (BadInputError, ModelError, OutOfMemory, Cancelled, InternalError)."""

    def __init__(self, message: str, kind: str = "InternalError", exit_code: Optional[int] = None,
                 details: str = "") -> None:
        super().__init__(message)
        self.kind = kind
        self.exit_code = exit_code
        self.details = details


class DetectionCancelled(DetectionError):
    def __init__(self) -> None:
        super().__init__("cancelled by user", kind="Cancelled", exit_code=130)


@dataclass
class DetectionOptions:
    model: Optional[str] = None  # registry id or model folder; None: the shipped default
    modality: Optional[str] = None  # None: the model's
    device: str = "auto"  # auto | cpu | cuda
    skull_strip: str = "auto"  # auto | deepbet | none
    bias_correction: bool = True
    registration: bool = True
    # The operating point: at most one of them; neither is the model's default (0.5 false findings per healthy scan
    # where the model is calibrated for findings, else every finding above the 1 % healthy voxel FPR threshold).
    fpr: Optional[float] = None  # healthy voxel false-positive rate of the threshold
    false_findings: Optional[float] = None  # false findings per healthy scan (lesion-level operating point)
    min_lesion_ml: float = 0.05
    per_lesion_segments: bool = False
    reuse_outputs: bool = True
    calibration: str = "adaptive"

    def request(self, input_path: Path, output_dir: Path, others: Optional[Dict[str, Path]] = None):
        """The worker's DetectionRequest for these options, built and checked by BrainAnomalyLib (the one place
        every front end builds one; a flat dict, as a parameter node gives it). `others` are a fusion model's
        other contrasts (modality -> exported file); the input is then the contrast `modality` names."""
        from BrainAnomalyLib.detection.request import DetectionRequest

        inputs = None
        if others:
            inputs = dict({self.modality: str(input_path)}, **{m: str(p) for m, p in others.items()})
        return DetectionRequest.from_dict({
            "input": None if others else str(input_path), "inputs": inputs, "output": str(output_dir),
            "model": self.model, "modality": None if others else self.modality,
            "device": self.device, "skull_strip": self.skull_strip, "bias_correction": self.bias_correction,
            "registration": self.registration, "fpr": self.fpr, "false_findings": self.false_findings,
            "calibration": self.calibration,
            "min_lesion_ml": float(self.min_lesion_ml), "output_format": "nrrd"})


def package_root() -> Path:
    """The folder that holds BrainAnomalyLib (the repository root, or the extension's scripted-modules folder)."""
    here = Path(__file__).resolve().parent
    for folder in (here, *here.parents):
        if (folder / "BrainAnomalyLib" / "__init__.py").is_file():
            return folder
    raise DetectionError("BrainAnomalyLib is not installed beside the module", kind="InstallError")


def resources_root() -> Path:
    here = Path(__file__).resolve().parent
    for folder in (here, *here.parents):
        if (folder / "Resources" / "Models" / "models.json").is_file():
            return folder / "Resources"
    return package_root() / "Resources"


def worker_environment() -> dict:
    env = dict(os.environ)
    root = str(package_root())
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("BRAINANOMALY_RESOURCES", str(resources_root()))
    env["PYTHONUNBUFFERED"] = "1"
    return env


class DetectionRun:
    """One detection in flight. `poll()` is cheap and never blocks, so a GUI timer can drive it; `wait()` blocks.
    The run keeps its own input node: results always go with the scan they were computed from, whatever the
    panel shows by then."""

    def __init__(self, input_node, options: DetectionOptions, python: Optional[str] = None,
                 on_event: Optional[EventFn] = None, process_factory: Optional[ProcessFactory] = None,
                 others: Optional[Dict[str, object]] = None) -> None:
        self.input_node = input_node
        self.others = dict(others or {})  # a fusion model's other contrasts: modality -> volume node
        self.options = DetectionOptions(**asdict(options))
        self.python = python or python_executable()
        self.on_event = on_event or (lambda e: None)
        self.process_factory = process_factory or InferenceProcess
        self.workdir = Path(tempfile.mkdtemp(prefix="BrainAnomaly-"))
        self.output_dir = self.workdir / "out"
        self.process: Optional[InferenceProcess] = None
        self.error: Optional[DetectionError] = None
        self.state = "new"  # new -> running -> done | failed | cancelled
        self._last_error_event: Optional[dict] = None

    def start(self) -> "DetectionRun":
        try:
            input_path = self.workdir / "input.nrrd"
            sitk.WriteImage(nodes.node_to_image(self.input_node), str(input_path), True)
            others = {}
            for modality, node in self.others.items():
                others[modality] = self.workdir / f"input-{modality}.nrrd"
                sitk.WriteImage(nodes.node_to_image(node), str(others[modality]), True)
            self.process = self.process_factory(self.command(input_path, others), worker_environment(),
                                                str(self.workdir)).start()
        except Exception:
            self.cleanup()
            raise
        self.state = "running"
        self.on_event({"event": "started", "device": self.options.device})
        return self

    def command(self, input_path: Path, others: Optional[Dict[str, Path]] = None) -> List[str]:
        """The worker reads the run's request as JSON (written beside the exported input)."""
        request = self.workdir / "request.json"
        self.options.request(input_path, self.output_dir, others).to_json(request)
        return [self.python, "-m", "BrainAnomalyLib.worker", "--request", str(request)]

    def poll(self) -> bool:
        """Pass new events on; True once the run has ended (see `state`)."""
        if self.state != "running":
            return True
        if self.process.cancelled:
            self.process.enforce_cancel()
        self._forward()
        if not self.process.finished():
            return False
        self._forward()  # lines read after the last poll
        self._ended()
        return True

    def _forward(self) -> None:
        for event in self.process.events():
            if event.get("event") == "error":
                self._last_error_event = event
            self.on_event(event)

    def _ended(self) -> None:
        code = self.process.returncode
        if self.process.cancelled:
            self.state, self.error = "cancelled", DetectionCancelled()
        elif code == 0 and (self.output_dir / "result.json").is_file():
            self.state = "done"
            return
        else:
            event = self._last_error_event or {}
            self.state = "failed"
            self.error = DetectionError(event.get("message") or f"inference process ended with exit code {code}",
                                        kind=event.get("kind", "InternalError"), exit_code=code,
                                        details=self.process.stderr_tail())
        self.cleanup()

    def wait(self, cancel_requested: Optional[Callable[[], bool]] = None, interval: float = 0.1) -> None:
        while not self.poll():
            if cancel_requested is not None and cancel_requested():
                self.cancel()
            time.sleep(interval)

    def cancel(self, wait: bool = True) -> None:
        """Stop the worker's whole process tree. With `wait=False` (a GUI) this returns at once and later `poll()`
        calls finish the job, killing the tree if it has not stopped within a few seconds."""
        if self.process is not None and self.state == "running":
            if wait:
                self.process.cancel()
                self.poll()
            else:
                self.process.request_cancel()

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def raise_for_state(self) -> None:
        if self.state in ("failed", "cancelled"):
            raise self.error
        if self.state != "done":
            raise DetectionError(f"detection has not finished (state {self.state})")


class DeviceQuery:
    """Asks the worker what PyTorch sees (`--list-devices`), so the panel never imports torch itself. `poll()`
    never blocks: None while the answer is on its way, then the worker's 'devices' event (an 'error' key when
    the worker could not tell)."""

    def __init__(self, python: Optional[str] = None, process_factory: Optional[ProcessFactory] = None) -> None:
        command = [python or python_executable(), "-m", "BrainAnomalyLib.worker", "--list-devices"]
        self.process = (process_factory or InferenceProcess)(command, worker_environment(), None).start()
        self.answer: Optional[dict] = None

    def poll(self) -> Optional[dict]:
        if self.answer is None and self.process.finished():
            found = [e for e in self.process.events() if e.get("event") == "devices"]
            self.answer = found[-1] if found else {
                "error": self.process.stderr_tail(3) or f"exit code {self.process.returncode}"}
        return self.answer


def _scan_curve(state: dict):
    """The slider's healthy FPR <-> raw score mapping for one scan: BrainAnomalyLib's CalibrationCurve of the curve
    the worker wrote (already moved to the scan when calibration is scan-adaptive); None if the model is
    uncalibrated."""
    from BrainAnomalyLib.calibration import CalibrationCurve

    return CalibrationCurve.from_dict(state.get("curve"))


@functools.lru_cache(maxsize=4)
def _finding_calibration(record: str):
    """The finding calibration of a result (its JSON text), built once: its conservative rates take a bootstrap
    (about half a second), which a slider being moved should not repeat."""
    from BrainAnomalyLib.calibration import FindingCalibration

    return FindingCalibration.from_dict(json.loads(record))


def _finding_rule(state: dict, false_findings: float):
    """(base threshold, FindingRule) of the lesion-level operating point at `false_findings` on this scan, from the
    scan curve and the model's finding calibration the worker wrote: what detect itself cuts and keeps."""
    from BrainAnomalyLib.calibration.findings import FindingRule, check_false_findings

    curve = _scan_curve(state)
    findings = _finding_calibration(json.dumps(state.get("findings"), sort_keys=True))
    if curve is None or findings is None:
        raise DetectionError("this result has no finding calibration (the model was not calibrated for findings, "
                             "or it is older); use the voxel threshold", kind="BadInputError")
    try:
        rule = FindingRule(curve, findings, check_false_findings(false_findings))
    except ValueError as exc:
        raise DetectionError(str(exc), kind="BadInputError") from None
    return float(curve.threshold(findings.base_fpr)), rule


def _findings(outputs: nodes.OutputNodes, state: dict, value: float, rule=None):
    """(each finding's number, 0 elsewhere; the lesion table) of the heatmap in the scene at `value`: what the
    label map, the segmentation and a DICOM export show."""
    from BrainAnomalyLib.detection.postprocess import label_array

    heat = nodes.node_array(outputs.heatmap)  # a view of the node's voxels: nothing copied
    return label_array(heat, nodes.node_ijk_to_ras(outputs.heatmap), value, state["min_lesion_ml"], numbered=True,
                       rule=rule)


class DetectionLogic:
    """Detection on one MRML scene. `process_factory` makes the worker's process (default: a real child process);
    tests pass their own to stand in for the worker."""

    def __init__(self, scene, python: Optional[str] = None,
                 process_factory: Optional[ProcessFactory] = None) -> None:
        self.scene = scene
        self.python = python
        self.process_factory = process_factory

    # -- running --
    def start(self, input_node, options: DetectionOptions, on_event: Optional[EventFn] = None,
              others: Optional[Dict[str, object]] = None) -> DetectionRun:
        """Start a detection on `input_node`; with `others` (a fusion model's other contrasts of the same session,
        modality -> volume node), `options.modality` names the input's contrast, which must be the one the fusion
        registers first (T1 when given), as the results go with it."""
        if input_node is None:
            raise DetectionError("select an input volume", kind="BadInputError")
        if others:
            from BrainAnomalyLib.detection.fusion import reference_contrast

            if not options.modality:
                raise DetectionError("say which contrast the input volume is", kind="BadInputError")
            reference = reference_contrast([options.modality, *others])
            if reference != options.modality:
                raise DetectionError(f"select the {reference} volume as the input: the fusion "
                                     "registers it first and the results go with it", kind="BadInputError")
        return DetectionRun(input_node, options, self.python, on_event, self.process_factory, others).start()

    def finish(self, run: DetectionRun) -> nodes.OutputNodes:
        """Bring a finished run's outputs into the scene, beside the run's own input (then remove its temporary
        folder)."""
        try:
            run.raise_for_state()
            return self.load_outputs(run.input_node, run.output_dir, run.options)
        finally:
            run.cleanup()

    def detect(self, input_node, options: DetectionOptions, on_event: Optional[EventFn] = None,
               cancel_requested: Optional[Callable[[], bool]] = None,
               others: Optional[Dict[str, object]] = None) -> nodes.OutputNodes:
        """Blocking detection (headless use, batch, tests); `others` as for `start`."""
        run = self.start(input_node, options, on_event, others)
        try:
            run.wait(cancel_requested)
        except BaseException:
            run.cancel()
            run.cleanup()
            raise
        return self.finish(run)

    def query_devices(self) -> DeviceQuery:
        return DeviceQuery(self.python, self.process_factory)

    # -- outputs --
    def load_outputs(self, input_node, folder, options: DetectionOptions) -> nodes.OutputNodes:
        """Read a worker's output folder into (new or reused) nodes. Everything is read before the scene is touched,
        and nodes made here are removed again if anything fails. The lesion table at the worker's threshold is the
        worker's own (it was given the minimum lesion size)."""
        folder = Path(folder)
        try:
            summary = json.loads((folder / "result.json").read_text(encoding="utf-8"))
            heat = sitk.ReadImage(str(folder / "anomaly_map.nrrd"), sitk.sitkFloat32)
            recon_path = folder / "reconstruction.nrrd"
            recon = sitk.ReadImage(str(recon_path), sitk.sitkFloat32) if recon_path.is_file() else None
            threshold = float(summary["threshold"]["value"])
            false_findings = summary["threshold"].get("false_findings")
            lesions = list(summary["lesions"])
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise DetectionError(f"the inference process left unreadable outputs ({exc})") from None
        roles = ["heatmap", "labelmap", "segmentation", "table"] + (["reconstruction"] if recon is not None else [])
        with nodes.transaction(self.scene) as tx:
            outputs = nodes.prepare_outputs(self.scene, input_node, tx, roles, options.reuse_outputs)
            nodes.update_node_from_image(outputs.heatmap, heat)
            if recon is not None:
                nodes.update_node_from_image(outputs.reconstruction, recon)
                nodes._display_node(self.scene, outputs.reconstruction)
            state = {"curve": summary.get("scan_calibration"), "findings": summary.get("finding_calibration"),
                     "window": summary.get("display_range"), "threshold": threshold,
                     "fpr": summary["threshold"].get("fpr"), "false_findings": false_findings,
                     "peak": summary.get("peak_score"),
                     # What the worker's table was made with (it was sent options.min_lesion_ml).
                     "min_lesion_ml": float(summary.get("min_lesion_ml", options.min_lesion_ml)),
                     "per_lesion": bool(options.per_lesion_segments), "model": summary.get("model"),
                     "modality": summary.get("modality"), "input": summary.get("input"),
                     "pred_score": summary.get("pred_score"),
                     "device": summary.get("device"), "timings": summary.get("timings"),
                     "notes": summary.get("notes", [])}
            outputs.heatmap.SetAttribute(nodes.CALIBRATION_ATTRIBUTE, json.dumps(state))
            nodes.show_heatmap(self.scene, outputs.heatmap, threshold, state["window"] or [threshold, threshold + 1.0],
                               state["peak"])
            rule = _finding_rule(state, false_findings)[1] if false_findings is not None else None
            self._threshold(outputs, state, threshold, state["fpr"], lesions, rule)
        return outputs

    def state(self, outputs: nodes.OutputNodes) -> dict:
        raw = outputs.heatmap.GetAttribute(nodes.CALIBRATION_ATTRIBUTE) if outputs.heatmap else None
        if not raw:
            raise DetectionError("this anomaly map has no BrainAnomaly calibration attached")
        return json.loads(raw)

    def calibration(self, outputs: nodes.OutputNodes):
        return _scan_curve(self.state(outputs))

    def apply_threshold(self, outputs: nodes.OutputNodes, fpr: Optional[float] = None, value: Optional[float] = None,
                        min_lesion_ml: Optional[float] = None, per_lesion: Optional[bool] = None,
                        false_findings: Optional[float] = None) -> dict:
        """New display threshold, label map, segmentation and lesion table from the anomaly map already in the
        scene. No model runs. At a number of `false_findings` per healthy scan (the lesion-level operating point:
        the findings at the scan's base threshold whose healthy rate is at most that, rarest first), at a healthy
        voxel FPR (through the scan's calibration: every finding above it) or at a raw score. With none of the
        three, the operating point in force stays (min_lesion_ml / per_lesion changes)."""
        state = self.state(outputs)
        if min_lesion_ml is not None:
            state["min_lesion_ml"] = float(min_lesion_ml)
        if per_lesion is not None:
            state["per_lesion"] = bool(per_lesion)
        if false_findings is None and fpr is None and value is None:
            false_findings = state.get("false_findings")
        if false_findings is not None:
            if fpr is not None or value is not None:
                raise DetectionError("give false findings, a healthy FPR or a raw score, not several",
                                     kind="BadInputError")
            base, rule = _finding_rule(state, false_findings)
            return self._threshold(outputs, state, base, rule.calibration.base_fpr, rule=rule)
        cal = _scan_curve(state)
        if value is None:
            if fpr is None:
                fpr = state.get("fpr")
            if fpr is None or cal is None:
                value = state["threshold"]
            else:
                value = cal.threshold(fpr)
        elif fpr is None and cal is not None:
            fpr = cal.fpr(value)
        return self._threshold(outputs, state, float(value), fpr)

    def _threshold(self, outputs: nodes.OutputNodes, state: dict, value: float, fpr: Optional[float],
                   lesions: Optional[List[dict]] = None, rule=None) -> dict:
        """Label map, segmentation and table at `value` (with a FindingRule: the findings it reports at that base
        threshold), straight from the heatmap node's voxels in memory. With `lesions` (the worker's table at this
        same operating point) the table is not recomputed."""
        numbered, found = _findings(outputs, state, value, rule)
        lesions = found if lesions is None else lesions
        geometry = nodes.node_geometry(outputs.heatmap)
        if outputs.labelmap is not None:
            nodes.update_labelmap(self.scene, outputs.labelmap, (numbered > 0).view(np.uint8), geometry)
        if outputs.segmentation is not None:
            nodes.update_segmentation(self.scene, outputs.segmentation, numbered, geometry, lesions,
                                      state["per_lesion"])
        if outputs.table is not None:
            nodes.update_table(outputs.table, lesions)
        nodes.set_display_threshold(outputs.heatmap, value, state.get("peak"))
        false_findings = rule.false_findings if rule is not None else None
        state.update(threshold=value, fpr=fpr, false_findings=false_findings, n_lesions=len(lesions))
        outputs.heatmap.SetAttribute(nodes.CALIBRATION_ATTRIBUTE, json.dumps(state))
        return {"threshold": value, "fpr": fpr, "false_findings": false_findings,
                "finding_threshold": rule.calibration.threshold(false_findings) if rule is not None else None,
                "lesions": lesions}

    def export_dicom(self, outputs: nodes.OutputNodes, source_folder, output_folder,
                     per_lesion: Optional[bool] = None, overwrite: bool = False) -> List[Path]:
        """The findings shown (the label map's, at the operating point in force) as a DICOM SEG, one segment per
        finding numbered as in the table or one "Anomaly" segment (`per_lesion`; default: as the segmentation
        shows them), and the anomaly map as a DICOM Parametric Map, both referencing the DICOM series in
        `source_folder` the scan was loaded from (the folder's series with the most images, as detection reads
        it). Written into `output_folder` (new or empty; an earlier export there only with `overwrite`), both
        files or neither. Returns their paths; a DetectionError says why not (kind BadInputError: e.g. the
        series is not the one the results lie on)."""
        from BrainAnomalyLib.core.dicom import DICOM_OUTPUTS, export_dicom
        from BrainAnomalyLib.core.errors import BrainAnomalyError
        from BrainAnomalyLib.detection.writers import staged_output

        state = self.state(outputs)
        rule = None
        if state.get("false_findings") is not None:
            rule = _finding_rule(state, state["false_findings"])[1]
        numbered, lesions = _findings(outputs, state, float(state["threshold"]), rule)
        try:
            heat = nodes.node_to_image(outputs.heatmap)  # world geometry: a moved volume no longer fits its series
        except nodes.NodeError as exc:
            raise DetectionError(str(exc), kind="BadInputError") from None
        findings = sitk.GetImageFromArray(numbered)
        findings.CopyInformation(heat)
        per_lesion = state.get("per_lesion", False) if per_lesion is None else per_lesion
        try:
            with staged_output(output_folder, overwrite, extra=DICOM_OUTPUTS) as stage:
                export_dicom(findings, lesions, heat, source_folder, stage, bool(per_lesion),
                             (state.get("model") or {}).get("name", ""), state.get("window"))
        except BrainAnomalyError as exc:
            raise DetectionError(str(exc), kind=type(exc).__name__, exit_code=exc.exit_code) from None
        return [Path(output_folder).absolute() / name for name in DICOM_OUTPUTS]

    def preview_threshold(self, outputs: nodes.OutputNodes, fpr: Optional[float] = None,
                          false_findings: Optional[float] = None) -> float:
        """What a slider being dragged shows at once; `apply_threshold` then brings label map, segmentation and table
        along. At a healthy FPR: the heatmap's display threshold moves there and the raw score is returned. At a
        number of false findings: the findings are cut at the scan's fixed base threshold, so the display stays
        and the finding score a finding needs to be reported is returned."""
        state = self.state(outputs)
        if false_findings is not None:
            _, rule = _finding_rule(state, false_findings)
            return float(rule.calibration.threshold(false_findings))
        cal = _scan_curve(state)
        value = cal.threshold(fpr) if cal is not None and fpr is not None else float(state["threshold"])
        nodes.set_display_threshold(outputs.heatmap, float(value), state.get("peak"))
        return float(value)

    def show(self, input_node, outputs: nodes.OutputNodes, opacity: float = 0.6) -> None:
        nodes.show_in_slice_views(self.scene, input_node, outputs.heatmap, opacity)

    def set_opacity(self, outputs: nodes.OutputNodes, opacity: float) -> None:
        nodes.set_opacity(self.scene, opacity, outputs.heatmap)

    def jump_to_lesion(self, outputs: nodes.OutputNodes, row: int) -> Optional[List[float]]:
        ras = nodes.lesion_position(outputs.table, row) if outputs.table is not None else None
        if ras is not None:
            nodes.jump_to(self.scene, ras)
        return ras

    def outputs_for(self, input_node) -> nodes.OutputNodes:
        return nodes.find_outputs(self.scene, input_node)

    def is_output(self, node) -> bool:
        """True for the nodes this module makes (never to be offered as an input)."""
        return node is not None and bool(node.GetAttribute(nodes.ROLE_ATTRIBUTE))


def available_models() -> List[dict]:
    """Registry entries (shipped and user models) for the model selector."""
    from BrainAnomalyLib.store.models import list_models

    return list_models()

"""Detection for the BrainAnomaly module without any GUI: export the input, run the worker process, bring its
outputs into the scene, and re-threshold them on demand. The widget, the batch script and the tests all drive
this one class; it never opens a dialog.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional

import SimpleITK as sitk

from . import nodes
from .process import InferenceProcess, python_executable

EventFn = Callable[[dict], None]
OUT_OF_MEMORY = "OutOfMemory"
MIN_BATCH = 1


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


class OutOfMemory(DetectionError):
    """Out of GPU memory even at the smallest batch: the caller may offer the CPU."""


@dataclass
class DetectionOptions:
    model: Optional[str] = None  # registry id or model folder; None: the shipped default
    modality: Optional[str] = None  # None: the model's
    device: str = "auto"  # auto | cpu | cuda
    skull_strip: str = "auto"  # auto | deepbet | none
    bias_correction: bool = True
    registration: bool = True
    fpr: float = 0.01  # healthy false-positive rate of the threshold
    min_lesion_ml: float = 0.05
    per_lesion_segments: bool = False
    reuse_outputs: bool = True
    batch_size: Optional[int] = None  # slices per forward pass; halved on GPU out-of-memory
    calibration: str = "adaptive"

    def worker_args(self) -> List[str]:
        args = ["--device", self.device, "--skull-strip", self.skull_strip, "--fpr", repr(float(self.fpr)),
                "--calibration", self.calibration, "--min-lesion-ml", repr(float(self.min_lesion_ml))]
        if self.model:
            args += ["--model", str(self.model)]
        if self.modality:
            args += ["--modality", self.modality]
        if not self.bias_correction:
            args.append("--no-bias-correction")
        if not self.registration:
            args.append("--no-register")
        if self.batch_size:
            args += ["--batch-size", str(int(self.batch_size))]
        return args


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


class DetectionRun:
    """One detection in flight. `poll()` is cheap and never blocks, so a GUI timer can drive it; `wait()` blocks.
    On GPU out-of-memory it starts again with half the batch, down to one slice, before giving up."""

    def __init__(self, input_node, options: DetectionOptions, python: Optional[str] = None,
                 on_event: Optional[EventFn] = None, default_batch: int = 32) -> None:
        self.input_node = input_node
        self.options = DetectionOptions(**asdict(options))
        self.python = python or python_executable()
        self.on_event = on_event or (lambda e: None)
        self.default_batch = default_batch
        self.workdir = Path(tempfile.mkdtemp(prefix="BrainAnomaly-"))
        self.output_dir = self.workdir / "out"
        self.process: Optional[InferenceProcess] = None
        self.error: Optional[DetectionError] = None
        self.state = "new"  # new -> running -> done | failed | cancelled
        self._last_error_event: Optional[dict] = None

    # -- lifecycle --
    def start(self) -> "DetectionRun":
        try:
            image = nodes.node_to_image(self.input_node)
            input_path = self.workdir / "input.nrrd"
            sitk.WriteImage(image, str(input_path), True)
        except Exception:
            self.cleanup()
            raise
        self._input_path = input_path
        self._launch()
        return self

    def command(self) -> List[str]:
        return [self.python, "-m", "BrainAnomalyLib.worker", "--input", str(self._input_path),
                "--output-dir", str(self.output_dir), *self.options.worker_args()]

    def environment(self) -> dict:
        env = dict(os.environ)
        root = str(package_root())
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env.setdefault("BRAINANOMALY_RESOURCES", str(resources_root()))
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _launch(self) -> None:
        shutil.rmtree(self.output_dir, ignore_errors=True)
        self._last_error_event = None
        self.process = InferenceProcess(self.command(), env=self.environment(), cwd=str(self.workdir)).start()
        self.state = "running"
        self.on_event({"event": "started", "device": self.options.device, "batch_size": self.options.batch_size})

    def poll(self) -> bool:
        """Pass new events on; True once the run has ended (see `state`)."""
        if self.state != "running":
            return True
        if self.process.cancelled:
            self.process.enforce_cancel()
        for event in self.process.events():
            if event.get("event") == "error":
                self._last_error_event = event
            self.on_event(event)
        if not self.process.finished():
            return False
        for event in self.process.events():  # lines read after the last poll
            if event.get("event") == "error":
                self._last_error_event = event
            self.on_event(event)
        return self._ended()

    def _ended(self) -> bool:
        code = self.process.returncode
        if self.process.cancelled:
            self.state, self.error = "cancelled", DetectionCancelled()
            self.cleanup()
            return True
        if code == 0 and (self.output_dir / "result.json").is_file():
            self.state = "done"
            return True
        event = self._last_error_event or {}
        kind = event.get("kind", "InternalError")
        if kind == OUT_OF_MEMORY and self.options.device != "cpu":
            batch = self.options.batch_size or self.default_batch
            if batch > MIN_BATCH:
                self.options.batch_size = max(MIN_BATCH, batch // 2)
                self.on_event({"event": "log", "message": f"out of GPU memory; trying again with batch size "
                                                          f"{self.options.batch_size}"})
                self._launch()
                return False
        message = event.get("message") or f"inference process ended with exit code {code}"
        details = self.process.stderr_tail()
        cls = OutOfMemory if kind == OUT_OF_MEMORY else DetectionError
        self.state, self.error = "failed", cls(message, kind=kind, exit_code=code, details=details)
        self.cleanup()
        return True

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


class Calibration:
    """Maps the threshold slider's healthy false-positive rate to a raw score and back for one scan, from the
    FPR -> threshold curve the worker wrote (already moved to the scan when calibration is scan-adaptive)."""

    def __init__(self, curve: Optional[dict]) -> None:
        self.curve = curve
        self._meta = {"calibration": {"curve": curve}} if curve else {}

    @property
    def calibrated(self) -> bool:
        return self.curve is not None

    def threshold(self, fpr: float) -> float:
        from BrainAnomalyLib.calibration.curve import threshold_for_fpr

        return threshold_for_fpr(self._meta, fpr)

    def fpr(self, value: float) -> Optional[float]:
        from BrainAnomalyLib.calibration.curve import fpr_for_threshold

        return fpr_for_threshold(self._meta, value) if self.curve else None


class DetectionLogic:
    def __init__(self, scene, python: Optional[str] = None) -> None:
        self.scene = scene
        self.python = python

    # -- running --
    def start(self, input_node, options: DetectionOptions, on_event: Optional[EventFn] = None) -> DetectionRun:
        if input_node is None:
            raise DetectionError("select an input volume", kind="BadInputError")
        return DetectionRun(input_node, options, self.python, on_event).start()

    def finish(self, run: DetectionRun) -> nodes.OutputNodes:
        """Bring a finished run's outputs into the scene (then remove its temporary folder)."""
        try:
            run.raise_for_state()
            return self.load_outputs(run.input_node, run.output_dir, run.options)
        finally:
            run.cleanup()

    def detect(self, input_node, options: DetectionOptions, on_event: Optional[EventFn] = None,
               cancel_requested: Optional[Callable[[], bool]] = None) -> nodes.OutputNodes:
        """Blocking detection (headless use, batch, tests)."""
        run = self.start(input_node, options, on_event)
        try:
            run.wait(cancel_requested)
        except BaseException:
            run.cancel()
            run.cleanup()
            raise
        return self.finish(run)

    # -- outputs --
    def load_outputs(self, input_node, folder, options: DetectionOptions) -> nodes.OutputNodes:
        """Read a worker's output folder into (new or reused) nodes. Everything is read before the scene is touched,
        and nodes made here are removed again if anything fails."""
        folder = Path(folder)
        try:
            summary = json.loads((folder / "result.json").read_text(encoding="utf-8"))
            heat = sitk.ReadImage(str(folder / "anomaly_map.nrrd"), sitk.sitkFloat32)
            recon_path = folder / "reconstruction.nrrd"
            recon = sitk.ReadImage(str(recon_path), sitk.sitkFloat32) if recon_path.is_file() else None
        except (OSError, ValueError, RuntimeError) as exc:
            raise DetectionError(f"the inference process left unreadable outputs ({exc})") from None
        roles = ["heatmap", "labelmap", "segmentation", "table"] + (["reconstruction"] if recon is not None else [])
        with nodes.transaction(self.scene) as tx:
            outputs = nodes.prepare_outputs(self.scene, input_node, tx, roles, options.reuse_outputs)
            nodes.update_node_from_image(outputs.heatmap, heat)
            if recon is not None:
                nodes.update_node_from_image(outputs.reconstruction, recon)
                nodes._display_node(self.scene, outputs.reconstruction)
            state = {"curve": summary.get("scan_calibration"), "window": summary.get("display_range"),
                     "threshold": summary["threshold"]["value"], "fpr": summary["threshold"].get("fpr"),
                     "min_lesion_ml": float(options.min_lesion_ml),
                     "per_lesion": bool(options.per_lesion_segments), "model": summary.get("model"),
                     "modality": summary.get("modality"), "pred_score": summary.get("pred_score"),
                     "timings": summary.get("timings"), "notes": summary.get("notes", [])}
            outputs.heatmap.SetAttribute(nodes.CALIBRATION_ATTRIBUTE, json.dumps(state))
            nodes.show_heatmap(self.scene, outputs.heatmap, state["threshold"], state["window"] or
                               [state["threshold"], state["threshold"] + 1.0])
            self.apply_threshold(outputs, value=state["threshold"], fpr=state["fpr"])
        return outputs

    def state(self, outputs: nodes.OutputNodes) -> dict:
        raw = outputs.heatmap.GetAttribute(nodes.CALIBRATION_ATTRIBUTE) if outputs.heatmap else None
        if not raw:
            raise DetectionError("this anomaly map has no BrainAnomaly calibration attached")
        return json.loads(raw)

    def calibration(self, outputs: nodes.OutputNodes) -> Calibration:
        return Calibration(self.state(outputs).get("curve"))

    def apply_threshold(self, outputs: nodes.OutputNodes, fpr: Optional[float] = None, value: Optional[float] = None,
                        min_lesion_ml: Optional[float] = None, per_lesion: Optional[bool] = None) -> dict:
        """New display threshold, label map, segmentation and lesion table from the anomaly map already in the
        scene, at a healthy FPR (through the scan's calibration) or a raw score. No model runs."""
        from BrainAnomalyLib.detection.postprocess import label_lesions

        state = self.state(outputs)
        cal = Calibration(state.get("curve"))
        if value is None:
            if fpr is None:
                fpr = state.get("fpr")
            if fpr is None or not cal.calibrated:
                value = state["threshold"]
            else:
                value = cal.threshold(fpr)
        elif fpr is None:
            fpr = cal.fpr(value)
        if min_lesion_ml is not None:
            state["min_lesion_ml"] = float(min_lesion_ml)
        if per_lesion is not None:
            state["per_lesion"] = bool(per_lesion)
        heat = nodes.node_to_image(outputs.heatmap)
        numbered, lesions = label_lesions(heat, float(value), state["min_lesion_ml"], numbered=True)
        if outputs.labelmap is not None:
            nodes.update_labelmap(self.scene, outputs.labelmap, sitk.Cast(numbered > 0, sitk.sitkUInt8))
        if outputs.segmentation is not None:
            nodes.update_segmentation(self.scene, outputs.segmentation, numbered, lesions, state["per_lesion"])
        if outputs.table is not None:
            nodes.update_table(outputs.table, lesions)
        nodes.set_display_threshold(outputs.heatmap, float(value))
        state.update(threshold=float(value), fpr=fpr, n_lesions=len(lesions))
        outputs.heatmap.SetAttribute(nodes.CALIBRATION_ATTRIBUTE, json.dumps(state))
        return {"threshold": float(value), "fpr": fpr, "lesions": lesions}

    def preview_threshold(self, outputs: nodes.OutputNodes, fpr: float) -> float:
        """Move only the heatmap's display threshold to a healthy FPR (cheap enough for a slider being dragged) and
        return the raw score; `apply_threshold` then brings label map, segmentation and table along."""
        state = self.state(outputs)
        cal = Calibration(state.get("curve"))
        value = cal.threshold(fpr) if cal.calibrated else float(state["threshold"])
        nodes.set_display_threshold(outputs.heatmap, float(value))
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


def available_models() -> List[dict]:
    """Registry entries (shipped and user models) for the model selector."""
    from BrainAnomalyLib.store.models import list_models

    return list_models()

"""The inference process a viewer (3D Slicer) starts: one scan in, the maps and a JSON summary out.

    python -m BrainAnomalyLib.worker --input scan.nrrd --output-dir OUT [--model ID] [--device auto] ...

Running detection in its own process keeps the viewer responsive, lets a cancel kill everything at once, frees
GPU memory when it ends and means a crash cannot take the viewer down. Progress travels as one JSON object per
stdout line:

    {"event": "progress", "step": "register", "fraction": 0.42}
    {"event": "log", "message": "..."}
    {"event": "done", "output_dir": "OUT"}
    {"event": "error", "kind": "BadInputError", "message": "...", "exit_code": 2}

Anything else a library prints goes to stderr, so stdout carries only these lines. OUT receives
anomaly_map.nrrd, brain_mask.nrrd, reconstruction.nrrd (when the model has one) and result.json (the summary, the
scan's FPR -> threshold curve and the display range), all moved in together at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import List, Optional

from .core.errors import BrainAnomalyError, Cancelled

OUT_OF_MEMORY = "OutOfMemory"
OUT_OF_MEMORY_EXIT = 4
OUTPUT_FILES = ("anomaly_map.nrrd", "brain_mask.nrrd", "result.json")


class Channel:
    """The protocol stream: a private copy of stdout; fd 1 itself is pointed at stderr so stray prints (from
    C extensions too) cannot break a line."""

    def __init__(self) -> None:
        sys.stdout.flush()
        self._out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        self._last = (None, -1.0)

    def send(self, event: str, **fields) -> None:
        self._out.write(json.dumps(dict(event=event, **fields)) + "\n")
        self._out.flush()

    def progress(self, step: str, fraction: float) -> None:
        # A step's fraction is sent when it moved by a percent, so the pipe is not flooded.
        last_step, last_fraction = self._last
        if step != last_step or fraction - last_fraction >= 0.01 or fraction >= 1.0:
            self.send("progress", step=step, fraction=round(float(fraction), 4))
            self._last = (step, fraction)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m BrainAnomalyLib.worker", description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="volume file")
    p.add_argument("--output-dir", required=True, help="folder for the outputs (created)")
    p.add_argument("--model", help="model id or folder (default: the shipped default)")
    p.add_argument("--modality", help="the scan's modality (default: the model's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--skull-strip", default=None, choices=["auto", "deepbet", "none"])
    p.add_argument("--no-bias-correction", action="store_true")
    p.add_argument("--no-register", action="store_true")
    p.add_argument("--fpr", type=float, default=None, help="healthy FPR of the initial threshold (default 0.01)")
    p.add_argument("--calibration", default="adaptive", choices=["adaptive", "cohort"])
    p.add_argument("--batch-size", type=int, default=None, help="slices per forward pass (learned scorers)")
    return p


def _is_out_of_memory(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.cuda.OutOfMemoryError):
            return True
    except ImportError:
        pass
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


def display_range(curve: Optional[dict], threshold: float, peak: float) -> List[float]:
    """Heatmap window: from the chosen threshold up to the score healthy brains reach at the curve's smallest FPR
    (so colour means the same between scans of one model), widened to the scan's peak when that is below it."""
    hi = max(curve["threshold"]) if curve else peak
    if hi <= threshold:
        hi = max(peak, threshold + 1e-3)
    return [float(threshold), float(hi)]


def detect(args, channel: Channel, cancel) -> Path:
    import numpy as np
    import SimpleITK as sitk

    from .calibration.curve import scan_curve
    from .cli.main import _preprocess_config
    from .core.io import read_volume, write_volume
    from .store.models import resolve_model
    from .detection.pipeline import Detector
    from .detection.postprocess import LESION_COLUMNS
    from .core.progress import Reporter

    reporter = Reporter(channel.progress, cancel)
    started = time.perf_counter()
    reporter("load model", 0.0)
    model = resolve_model(args.model)
    params = {"batch_size": args.batch_size} if args.batch_size else None
    det = Detector(model, device=args.device, preprocess_config=_preprocess_config(
        args, model.meta.get("preprocessing", {})), scorer_params=params, calibration=args.calibration)
    modality = det.check_modality(args.modality)
    chosen = det.threshold(fpr=args.fpr)
    channel.send("log", message=f"model {model.name} ({model.kind}, {model.modality}) on {det.device}")
    scan = read_volume(args.input)
    analysis = det.analyse(scan, reporter.sub(0.0, 0.9), declared=args.modality)  # overrides the contrast check
    chosen = det.for_scan(chosen, analysis)
    result = det.to_result(scan, analysis, chosen, modality, reporter.sub(0.9, 0.97))
    result.timings["total"] = round(time.perf_counter() - started, 3)
    curve = scan_curve(model.meta, analysis.stats if det.calibration == "adaptive" and not det.scorer.scan_relative
                       else None)
    peak = float(np.max(sitk.GetArrayViewFromImage(result.anomaly_map)))

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".partial-", dir=out))
    try:
        reporter("write outputs", 0.0)
        write_volume(result.anomaly_map, stage / "anomaly_map.nrrd")
        write_volume(result.brain_mask, stage / "brain_mask.nrrd")
        if result.reconstruction is not None:
            write_volume(result.reconstruction, stage / "reconstruction.nrrd")
        summary = dict(result.summary(), input=Path(args.input).name, lesion_columns=list(LESION_COLUMNS),
                       scan_calibration=curve, display_range=display_range(curve, chosen["value"], peak),
                       peak_score=peak, device=det.device,
                       model_meta={k: model.meta.get(k) for k in ("name", "kind", "version", "modality",
                                                                  "description")})
        (stage / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
        reporter.check()
        for f in stage.iterdir():
            os.replace(f, out / f.name)
        reporter("write outputs", 1.0)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    channel = Channel()
    from .core.progress import CancelToken

    cancel = CancelToken()

    def _stop(signum, frame):
        cancel.cancel()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        out = detect(args, channel, cancel)
    except Cancelled as exc:
        channel.send("error", kind="Cancelled", message=str(exc), exit_code=exc.exit_code)
        return exc.exit_code
    except BrainAnomalyError as exc:
        channel.send("error", kind=type(exc).__name__, message=str(exc), exit_code=exc.exit_code)
        return exc.exit_code
    except Exception as exc:  # the viewer must learn what went wrong whatever it was
        traceback.print_exc()
        if _is_out_of_memory(exc):
            channel.send("error", kind=OUT_OF_MEMORY, message=f"out of memory on {args.device}: {exc}",
                         exit_code=OUT_OF_MEMORY_EXIT)
            return OUT_OF_MEMORY_EXIT
        channel.send("error", kind="InternalError", message=f"{type(exc).__name__}: {exc}", exit_code=1)
        return 1
    channel.send("done", output_dir=str(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

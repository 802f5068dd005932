"""The inference process a viewer (3D Slicer) starts: one scan in, the outputs of the one writer out.

    python -m BrainAnomalyLib.worker --request REQUEST.json
    python -m BrainAnomalyLib.worker --list-devices    # one {"event": "devices", ...} line: what PyTorch sees
    python -m BrainAnomalyLib.worker --input scan.nrrd --output-dir OUT [detect's options: --model ID --device auto
                                     --fpr 0.01 --calibration adaptive --batch-size N --format nrrd ...]

REQUEST.json is a DetectionRequest (BrainAnomalyLib/detection/request.py) as a JSON object; the options are those
of `brainanomaly detect`, declared once for both. Outputs are NRRD unless the request says otherwise.

Running detection in its own process keeps the viewer responsive, lets a cancel kill everything at once, frees
GPU memory when it ends and means a crash cannot take the viewer down. Progress travels as one JSON object per
stdout line:

    {"event": "progress", "step": "register", "fraction": 0.42}
    {"event": "log", "message": "..."}
    {"event": "done", "output_dir": "OUT"}
    {"event": "error", "kind": "BadInputError", "message": "...", "exit_code": 2}

Anything else a library prints goes to stderr, so stdout carries only these lines. The error kinds are the
classes of core/errors.py (BadInputError 2, ModelError 3, OutOfMemoryError 4, Cancelled 130) or InternalError (1).
Running out of GPU memory is handled inside the detection (smaller batches, then the CPU, said in a "log" line and
in result.json's notes), so OutOfMemoryError means memory ran out even on the CPU: retrying cannot help. OUT
receives the files of detection/writers.py (anomaly_map, pred_mask, brain_mask, reconstruction when the model has
one, lesions.csv, result.json with the scan's FPR -> threshold curve and the display range, overlay.png), all
moved in together at the end. OUT must be new or empty, or hold only an earlier result and the request say
overwrite (then it is replaced whole); this is checked before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import List, Optional

from .core.errors import BadInputError, BrainAnomalyError
from .core.exit import run_command
from .detection.request import DetectionRequest, add_options


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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # reported on the protocol stream like any other bad input
        raise BadInputError(f"worker arguments: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m BrainAnomalyLib.worker", description=__doc__.split("\n")[0])
    p.add_argument("--request", help="DetectionRequest JSON file (instead of the options below)")
    p.add_argument("--list-devices", action="store_true", help="print one 'devices' line and exit")
    p.add_argument("--input", help="volume file")
    p.add_argument("--output-dir", dest="output", help="folder for the outputs (created; new or empty, or see "
                                                       "--overwrite)")
    add_options(p, output_format="nrrd")
    return p


def read_request(argv: Optional[List[str]]) -> DetectionRequest:
    args = build_parser().parse_args(argv)
    if args.request:
        given = [a for a in (argv or []) if a.startswith("--") and a != "--request"]
        if given:
            raise BadInputError(f"give --request or options, not both ({', '.join(given)})")
        request = DetectionRequest.from_json(args.request)
    else:
        request = DetectionRequest.from_args(args)
    if not (request.input or request.inputs) or not request.output:
        raise BadInputError("the request needs an input volume and an output folder")
    return request


def detect(request: DetectionRequest, channel: Channel, cancel) -> Path:
    from .core.progress import Reporter
    from .detection.pipeline import Detector
    from .detection.writers import check_output, write_result

    check_output(request.output, request.overwrite)  # before anything is loaded or computed
    reporter = Reporter(channel.progress, cancel)
    reporter("load model", 0.0)
    det = Detector.from_request(request)
    channel.send("log", message=f"model {det.model.name} ({det.model.kind}, {det.model.modality}) on {det.device}")
    result, scan = det.run_request(request, reporter.sub(0.0, 0.97))
    for note in result.notes:
        channel.send("log", message=note)
    return write_result(result, scan, request.output, request.output_format, request.input_name(),
                        reporter.sub(0.97, 1.0), overwrite=request.overwrite)


def list_devices() -> dict:
    """What PyTorch sees: its version (None when it is not installed) and each CUDA device."""
    try:
        import torch
    except ImportError:
        return {"torch": None, "cuda": []}
    try:
        cuda = [{"name": torch.cuda.get_device_name(i),
                 "memory_gb": round(torch.cuda.get_device_properties(i).total_memory / 2 ** 30, 1)}
                for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    except Exception as exc:  # a broken driver: report it, the CPU still works
        return {"torch": torch.__version__, "cuda": [], "error": f"{type(exc).__name__}: {exc}"}
    return {"torch": torch.__version__, "cuda": cuda}


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    channel = Channel()
    if "--list-devices" in argv:  # asked when the viewer's panel opens, so that the viewer never imports torch
        channel.send("devices", **list_devices())
        return 0
    from .core.progress import CancelToken

    cancel = CancelToken()

    def _stop(signum, frame):
        cancel.cancel()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        out = detect(read_request(argv), channel, cancel)
    except BrainAnomalyError as exc:
        channel.send("error", kind=type(exc).__name__, message=str(exc), exit_code=exc.exit_code)
        return exc.exit_code
    except Exception as exc:  # the viewer must learn what went wrong whatever it was
        traceback.print_exc()
        channel.send("error", kind="InternalError", message=f"{type(exc).__name__}: {exc}", exit_code=1)
        return 1
    channel.send("done", output_dir=str(out))
    return 0


if __name__ == "__main__":
    run_command(main)

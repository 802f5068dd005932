"""`brainanomaly calibrate`: re-calibrate a model's thresholds on a site's own healthy scans.

Healthy rows (empty mask) of a manifest go through the model's own preprocessing, scoring and post-processing;
the pooled cleaned maps over the whole brain mask give the FPR table and the dense curve stored in the model.
Optionally (--labelled), a handful of labelled lesion cases choose the threshold with the best pooled Dice, stored
beside the label-free calibration without replacing it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np

from ..calibration import DEFAULT_FALSE_FINDINGS, DEFAULT_FPR, DEFAULT_FPRS, FindingCalibration, with_labelled
from ..core.errors import BadInputError
from ..core.progress import CancelToken, Reporter
from .progress_bar import ProgressBar


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("calibrate", help="re-calibrate a model's thresholds (healthy voxel false-positive "
                                                "rates) on your own healthy scans")
    p.add_argument("--model", required=True, help="model id (see 'brainanomaly models') or model folder")
    p.add_argument("--manifest", required=True, help="CSV with subject,modality,image,mask: the healthy rows "
                                                     "(empty mask) are calibrated on")
    p.add_argument("--modality", help="which manifest rows to use (default: the model's modality)")
    p.add_argument("--split", choices=["all", "train", "calibration", "test"], default="all",
                   help="calibrate on this part of the manifest's subjects, split as `brainanomaly train` splits "
                        "them (calibration: the held-out scans a model trained on the same manifest was "
                        "calibrated on; default all)")
    p.add_argument("--fprs", default=",".join(f"{f:g}" for f in DEFAULT_FPRS),
                   help="comma-separated voxel false-positive rates for the table (default 0.001,0.01,0.05); "
                        "a dense curve from 1e-4 to 0.5 is stored as well")
    p.add_argument("--labelled", help="CSV of a few labelled lesion cases (rows with a mask): also store the "
                                      "threshold with the best pooled Dice on them, separately")
    p.add_argument("--device", default="cpu", help="device for the --labelled cases: cpu (default) | auto | cuda")
    p.add_argument("--cache-dir", help="where preprocessed volumes are cached (default ~/.cache/brainanomaly)")
    p.add_argument("--allow-few-scans", action="store_true",
                   help="calibrate on fewer than 5 healthy scans (refused without it); the model's calibration "
                        "record then says so (few_scans in model.json)")
    p.add_argument("-o", "--output", help="write a calibrated copy of the model to this folder (default: update "
                                          "the model in place; required for a shipped model)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def parse_fprs(text: str) -> List[float]:
    try:
        fprs = [float(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise BadInputError(f"--fprs: expected comma-separated numbers such as 0.001,0.01,0.05 (got {text!r})") \
            from None
    if not fprs:
        raise BadInputError("--fprs: give at least one false-positive rate")
    bad = [f for f in fprs if not 0.0 < f < 1.0]
    if bad:
        got = ", ".join(f"{f:g}" for f in bad)
        raise BadInputError(f"--fprs: false-positive rates lie between 0 and 1 (got {got})")
    return sorted(set(fprs))


def _shipped_folders() -> dict:
    """Resolved folder -> id for every model listed in the shipped registry."""
    from ..store.models import shipped_entries, shipped_registry_file

    try:
        entries = shipped_entries()
    except (OSError, ValueError):
        return {}
    base = shipped_registry_file().parent
    return {(base / e["path"]).resolve(): e["id"] for e in entries if "path" in e and "id" in e}


def target_folder(model_path: Path, output: Optional[str]) -> Tuple[Path, bool]:
    """Where the calibrated model goes, and whether that is the model's own folder. A shipped model is never
    rewritten in place (its registry checksum would no longer match)."""
    from ..store.models import META_FILE

    shipped = _shipped_folders()
    here = Path(model_path).resolve()
    if output is None:
        if here in shipped:
            raise BadInputError(f"{shipped[here]} is a shipped model and is not changed in place (its registry "
                                "checksum would break); pass -o FOLDER to write a calibrated copy, e.g. "
                                f"-o ~/.brainanomaly/models/{shipped[here]}-local")
        return here, True
    out = Path(output).expanduser()
    resolved = out.resolve()
    if resolved in shipped and resolved != here:
        raise BadInputError(f"{out} is the shipped model {shipped[resolved]}; choose another -o folder")
    if resolved == here:
        if here in shipped:
            raise BadInputError(f"{out} is the shipped model {shipped[here]}; choose another -o folder")
        return here, True
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / META_FILE).is_file())):
        raise BadInputError(f"{out} exists and is not a model folder; refusing to replace it")
    return out, False


def run(args, cancel: CancelToken) -> int:
    from .. import __version__
    from ..core.manifest import normalise_modality, read_manifest, skipped_rows
    from ..store.models import resolve_model, save_model
    from ..training.run import calibrate, check_calibration_scans, labelled_threshold

    fprs = parse_fprs(args.fprs)
    model = resolve_model(args.model)  # ModelError (exit 3) for an unknown, broken or tampered model
    target, in_place = target_folder(model.path, args.output)
    modality = normalise_modality(args.modality) if args.modality else model.modality
    if modality != model.modality:
        print(f"note: calibrating a {model.modality} model on {modality} rows, as asked", file=sys.stderr)
    other_rows = []
    if model.kind == "fusion":
        # a fusion calibrates on sessions: each subject's rows of its contrasts together (training.run.calibrate)
        rows = read_manifest(args.manifest)
    else:
        rows = read_manifest(args.manifest, modality, other_rows)
    if other_rows:
        print(skipped_rows(other_rows, len(rows) + len(other_rows), f"calibrating on {modality}"), file=sys.stderr)
    healthy = [c for c in rows if c.mask is None]
    split_name = getattr(args, "split", "all")
    if split_name != "all":
        from ..training.run import split_subjects

        healthy = split_subjects(healthy)[split_name]
    if not healthy:
        raise BadInputError(f"{args.manifest}: no healthy {modality} rows (rows with an empty mask column)"
                            + (f" in the {split_name} split" if split_name != "all" else ""))
    allow_few = getattr(args, "allow_few_scans", False)
    if model.kind == "fusion" and args.labelled:
        raise BadInputError("--labelled is not available for a fusion model yet; calibrate it on healthy sessions")
    if model.kind != "fusion":  # a fusion counts sessions, not rows (training.run.calibrate)
        check_calibration_scans(len(healthy), allow_few, f"healthy {modality} scan(s) to calibrate on"
                                + (f" in the {split_name} split" if split_name != "all" else ""))
    lesion_cases = []
    if args.labelled:
        lesion_cases = [c for c in read_manifest(args.labelled, modality) if c.mask is not None]
        if not lesion_cases:
            raise BadInputError(f"{args.labelled}: no labelled {modality} rows (rows with a mask)")
    cache_dir = Path(args.cache_dir).expanduser() if args.cache_dir else None


    bar = ProgressBar(args.quiet, "calibrate")
    reporter = Reporter(bar, cancel)
    split = 0.7 if lesion_cases else 1.0
    t = time.perf_counter()
    try:
        try:
            calib = calibrate(model, healthy, reporter.sub(0.0, split), cache_dir, fprs, allow_few)
        except ValueError as exc:
            raise BadInputError(str(exc)) from None
        calib.update(manifest=Path(args.manifest).name, modality=modality, split=split_name,
                     created_with=f"BrainAnomalyLib {__version__}")
        lab = None
        if lesion_cases:
            lab = labelled_threshold(model, lesion_cases, reporter.sub(split, 1.0), args.device)
            lab["manifest"] = Path(args.labelled).name
        with_labelled(calib, lab, (model.meta.get("calibration") or {}).get("labelled"))
        calib["seconds"] = round(time.perf_counter() - t, 1)
        meta = dict(model.meta, calibration=calib)
    finally:
        bar.close()
    try:
        folder = save_model(target, meta, model.tensors, keep_files_of=model.path)
    except OSError as exc:
        raise BadInputError(f"cannot write the model to {target}: {exc}") from None
    print(format_report(model.name, calib, folder, in_place))
    skipped = list(calib.get("skipped", [])) + (list(calib["labelled"].get("skipped", [])) if lesion_cases else [])
    for s in skipped:
        print(f"skipped: {s}", file=sys.stderr)
    return 0


def _pct(f: Optional[float]) -> str:
    return "?" if f is None else f"{100 * f:.3g} %"


def format_report(name: str, calib: dict, folder: Path, in_place: bool) -> str:
    lines = [f"calibrated {name} on {calib['n_scans']} healthy {calib.get('modality', '')} scan(s) of "
             f"{len(calib.get('subjects', []))} subject(s), over the whole brain mask"
             + (f"; {len(calib['skipped'])} skipped" if calib.get("skipped") else "") + ":",
             "  healthy voxel FPR   threshold"]
    for k, v in sorted(calib["thresholds"].items(), key=lambda kv: float(kv[0])):
        mark = "  (default)" if np.isclose(float(k), DEFAULT_FPR) else ""
        lines.append(f"  {_pct(float(k)):>17}   {v:.4g}{mark}")
    found = FindingCalibration.from_dict(calib.get("findings"))
    if found is not None:
        lines.append(f"lesion-level: {found.scores.size / found.n_scans:.1f} findings per healthy scan at the "
                     f"{_pct(found.base_fpr)} voxel threshold; the default {DEFAULT_FALSE_FINDINGS:g} false findings "
                     f"per healthy scan reports findings scoring at least {found.threshold(DEFAULT_FALSE_FINDINGS):.3g}"
                     " (detection's default operating point)")
    lab = calib.get("labelled")
    if lab:
        fpr = _pct(lab.get("healthy_fpr"))
        ts = (calib.get("curve") or {}).get("threshold") or []
        if ts and lab["threshold"] > max(ts):
            fpr = f"below {fpr}"  # beyond the calibrated range: the curve clamps
        elif ts and lab["threshold"] < min(ts):
            fpr = f"above {fpr}"
        lines.append(f"labelled refinement ({lab['n_cases']} case(s), stored separately; detection still defaults "
                     f"to the label-free calibration): threshold {lab['threshold']:.4g}, pooled "
                     f"Dice {lab['dice']:.3f}, healthy FPR {fpr}")
    if calib.get("few_scans"):
        lines.append(f"note: {calib['few_scans']['note']}")
    lines.append(f"model {'updated in place' if in_place else 'written'}: {folder}")
    return "\n".join(lines)

#!/usr/bin/env python
"""Change how a trained learned model scores, without training it again: its score maps (--score) or arch keys that
hold no weights (--arch, e.g. a diffusion model's t_stars, ddim_steps, latent_threshold, mask_residual), then fit
the voxel-wise healthy statistics again on the same training subjects and calibrate again on the same calibration
subjects. The weights are copied unchanged; an arch change that would need other weights is refused.

This is how ablations of scoring choices are measured on one trained network (see the model cards):

    python scripts/rescore_model.py --model build/models/ldm-t1-ixi --manifest ../shared/data/ixi_t1_2mm.csv \\
        --arch '{"mask_residual": false}' -o build/models/ldm-t1-ixi-decoded
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from BrainAnomalyLib.core.errors import ModelError  # noqa: E402
from BrainAnomalyLib.store.models import load_model, resolve_model, save_model  # noqa: E402
from BrainAnomalyLib.detection.pipeline import Detector  # noqa: E402
from BrainAnomalyLib.core.progress import Reporter  # noqa: E402
from BrainAnomalyLib.scorers.learned import fit_residual_norm, scorer_class_for  # noqa: E402
from BrainAnomalyLib.store.cache import grid_volumes  # noqa: E402
from BrainAnomalyLib.training.run import calibrate, recorded_splits  # noqa: E402


def rescored_params(model, arch_changes: dict, score) -> dict:
    """The model's params with the new arch keys and score, checked: the network must still take the weights."""
    params = dict(model.meta.get("params", {}))
    if "arch" not in params:
        raise ModelError(f"{model.name} is a {model.kind!r} model, not a learned one")
    params["arch"] = dict(params["arch"], **arch_changes)
    if score:
        params["score"] = score
    params.pop("residual_norm", None)
    net_tensors = {k: v for k, v in model.tensors.items() if k.startswith("net.")}
    scorer = scorer_class_for(model.kind)(dict(params, residual_norm=None), net_tensors, "cpu")
    try:
        scorer.net()
    except (ModelError, RuntimeError, ValueError) as e:
        first = [line.strip() for line in str(e).splitlines() if line.strip()][:2]  # torch lists every tensor
        raise ModelError(f"the changed arch does not take {model.name}'s weights: {' '.join(first)}") from e
    return params


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a trained learned model (folder or id)")
    ap.add_argument("--manifest", required=True, help="the manifest it was trained on (same subjects, same split)")
    ap.add_argument("--arch", default="{}", help="JSON object of arch keys to change")
    ap.add_argument("--score", help="new score (e.g. signed, l1, perceptual+signed)")
    ap.add_argument("--name", help="name of the new model (default: the output folder's name)")
    ap.add_argument("--cache-dir", type=Path)
    ap.add_argument("-o", "--output", required=True, type=Path)
    args = ap.parse_args(argv)
    try:
        model = resolve_model(args.model)
        changes = json.loads(args.arch)
        if not isinstance(changes, dict):
            raise ValueError("--arch must be a JSON object")
        if args.output.resolve() == Path(model.path).resolve():
            raise ValueError("--output must be a new folder, not the model itself")
        params = rescored_params(model, changes, args.score)
        info = model.meta.get("training_data", {})
        if info.get("manifest") and info["manifest"] != Path(args.manifest).name:
            raise ValueError(f"{model.name} was trained on {info['manifest']}, not {Path(args.manifest).name}")
        splits, train_cases = recorded_splits(model, Path(args.manifest))
    except (ModelError, ValueError, json.JSONDecodeError) as e:
        print(f"rescore_model: {e}", file=sys.stderr)
        return 2

    def progress(step, fraction, _last=[None]):
        if step != _last[0]:
            print(f"[{fraction:4.0%}] {step}", file=sys.stderr, flush=True)
            _last[0] = step

    reporter = Reporter(progress)
    det = Detector(model, device="cpu")
    tensors = {k: v for k, v in model.tensors.items() if not k.startswith("norm.")}
    if model.meta.get("params", {}).get("residual_norm"):
        volumes = grid_volumes(train_cases, det.preprocess_config, det.grid, reporter, args.cache_dir)
        params, tensors = fit_residual_norm(model.kind, params, tensors, volumes, reporter, "cpu", len(train_cases))
    meta = dict(model.meta, name=args.name or args.output.name, params=params)
    # Calibrated on the original's split: fewer scans than the minimum only where the original was allowed them.
    allow_few = bool((model.meta.get("calibration") or {}).get("few_scans"))
    meta.pop("calibration", None)
    meta["rescored_from"] = {"model": model.name, "arch_changes": changes, "score": args.score}
    folder = save_model(args.output, meta, tensors)
    meta["calibration"] = calibrate(load_model(folder), splits["calibration"], reporter, args.cache_dir,
                                    allow_few_scans=allow_few)
    save_model(args.output, meta, tensors)
    print(f"written {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The realism check of `brainanomaly train` (BrainAnomalyLib/evaluation/realism.py) on a ddpm or ldm model folder
trained already, e.g. by a version without the check. Held-out and training subjects come from the manifest exactly
as `train` split them (healthy rows, training.split_subjects, the first n_train training subjects as model.json
records, validation_split), and the scans from the same preprocessing cache. Writes realism.json and samples.png to
the model folder's training/ (or --out) and prints the distances.

    python scripts/diffusion_realism.py --model models/my-ddpm --manifest healthy.csv --modality T1 \
        [--encoder dpa-t1-ixi] [--samples 256] [--steps 50] [--seed 0] [--batch 32] [--device cpu] \
        [--cache-dir DIR] [--out DIR]
"""

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from BrainAnomalyLib.core.device import resolve_device  # noqa: E402
from BrainAnomalyLib.evaluation.realism import DEFAULT_ENCODER, DEFAULT_SAMPLES, DEFAULT_STEPS  # noqa: E402
from BrainAnomalyLib.training.realism_run import realism_for_cases  # noqa: E402
from BrainAnomalyLib.store.models import load_model  # noqa: E402
from BrainAnomalyLib.preprocess.chain import PreprocessConfig  # noqa: E402
from BrainAnomalyLib.core.progress import Reporter  # noqa: E402
from BrainAnomalyLib.scorers.learned import scorer_class_for  # noqa: E402
from BrainAnomalyLib.core.template import Grid  # noqa: E402
from BrainAnomalyLib.training.run import recorded_splits, validation_split  # noqa: E402


def progress(step: str, fraction: float, _last=[-1]) -> None:
    tenth = int(fraction * 10)
    if tenth != _last[0]:
        print(f"  {fraction:4.0%} {step}", file=sys.stderr, flush=True)
        _last[0] = tenth


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a trained ddpm or ldm model folder")
    p.add_argument("--manifest", required=True, help="the CSV the model was trained from")
    p.add_argument("--modality", default="T1")
    p.add_argument("--encoder", default=DEFAULT_ENCODER, help=f"model holding the feature net (default "
                                                             f"{DEFAULT_ENCODER})")
    p.add_argument("--samples", type=int, default=DEFAULT_SAMPLES)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="DDIM steps per sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=32, help="samples per UNet pass")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--cache-dir", help="preprocessing cache (default as for train)")
    p.add_argument("--out", help="output folder (default MODEL/training)")
    args = p.parse_args()

    model = load_model(args.model)
    modality = args.modality.upper()
    if model.modality != modality:
        p.error(f"the model is for {model.modality}, not {modality}")
    meta = model.meta
    splits, train_cases = recorded_splits(model, Path(args.manifest))
    fit_cases, _ = validation_split(train_cases)
    pre = PreprocessConfig.from_dict(meta.get("preprocessing", {}))
    device = resolve_device(args.device)
    net = scorer_class_for(model.kind)(meta["params"], model.tensors, device).net()
    out = Path(args.out) if args.out else Path(args.model) / "training"
    result = realism_for_cases(net, fit_cases, splits["calibration"], pre, Grid.from_dict(meta["grid"]), out,
                               context=int(meta["params"].get("context", 0)), modality=modality,
                               encoder=args.encoder, n=args.samples, steps=args.steps, seed=args.seed,
                               batch=args.batch, device=device,
                               cache_dir=Path(args.cache_dir) if args.cache_dir else None,
                               reporter=Reporter(progress))
    fd = result["fd"]
    print(f"{model.name}: FD to {result['n_held_out']} held-out real slices in {result['encoder']} features "
          f"(n = {result['n_samples']}, {result['steps']} DDIM steps): samples {fd['samples']:.4g}, "
          f"training slices {fd['training']:.4g} (floor), blurred training {fd['blurred_training']:.4g}; "
          f"sampling {result['sampling_seconds']} s")
    print(json.dumps({"realism": str(out / "realism.json"), "samples": str(out / "samples.png")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

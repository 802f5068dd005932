#!/usr/bin/env python
"""Pooled voxel AUPRC and best Dice of scorers on a lesion manifest (e.g. brats18_dev T1).

Each case is preprocessed once; every model (and, with --two-sided, its two-sided variant) scores it through the
evaluation of `brainanomaly evaluate` (the detect path); voxels inside the brain mask on the input grid are pooled.

    python scripts/baseline_scores.py --manifest ../shared/data/brats18_dev.csv --modality T1 \
        --models intensity-t1 normative-t1-ixi --two-sided [--json results.json]
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from BrainAnomalyLib.evaluation.evaluate import evaluate  # noqa: E402
from BrainAnomalyLib.core.manifest import read_manifest  # noqa: E402
from BrainAnomalyLib.store.models import resolve_model  # noqa: E402
from BrainAnomalyLib.detection.pipeline import Detector  # noqa: E402
from BrainAnomalyLib.core.progress import Reporter  # noqa: E402


def _log(step: str, fraction: float, _shown=set()) -> None:
    if step.startswith("evaluate") and step not in _shown:  # one line per case
        print(f"[{fraction:4.0%}] {step}", file=sys.stderr, flush=True)
        _shown.add(step)

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--modality", default="T1")
    ap.add_argument("--models", nargs="+", default=["intensity-t1", "normative-t1-ixi"])
    ap.add_argument("--two-sided", action="store_true", help="also score each model two-sided (|deviation|)")
    ap.add_argument("--json", help="write the table here as JSON")
    args = ap.parse_args()

    cases = [c for c in read_manifest(args.manifest, args.modality) if c.mask is not None]
    detectors = {}
    for name in args.models:
        model = resolve_model(name)
        detectors[f"{name} ({model.meta['params']['direction']})"] = Detector(model, device="cpu")
        if args.two_sided and model.meta["params"]["direction"] != "two-sided":
            detectors[f"{name} (two-sided)"] = Detector(model, device="cpu", scorer_params={"direction": "two-sided"})
    skipped = []
    results = evaluate(cases, detectors, Reporter(_log), skipped)
    for line in skipped:
        print(f"skipped: {line}", file=sys.stderr)
    rows = []
    for key, r in results.items():
        v = r["voxel"]
        rows.append({"scorer": key, "AUPRC": round(v["auprc"], 4), "best_dice": round(v["best_dice_upper_bound"], 4),
                     "best_dice_threshold": round(v["best_dice_threshold"], 4), "prevalence": round(v["prevalence"], 4),
                     "per_case_AUPRC": {c["case"]: c["ap"] for c in r["per_case"]}})
    print(f"\n{Path(args.manifest).name} {args.modality}: {len(cases)} cases, pooled over brain voxels "
          "on each input grid\n")
    print("| scorer | pooled AUPRC | best Dice (upper bound) | lesion prevalence |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['scorer']} | {r['AUPRC']:.3f} | {r['best_dice']:.3f} | {r['prevalence']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

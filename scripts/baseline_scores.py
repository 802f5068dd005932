#!/usr/bin/env python
"""Pooled voxel AUPRC and best Dice of scorers on a lesion manifest (e.g. brats18_dev T1).

Each case is preprocessed once; every model (and, with --two-sided, its two-sided variant) scores it through the
same post-processing and back-projection as `detect`; voxels inside the brain mask on the input grid are pooled.

    python scripts/baseline_scores.py --manifest ../shared/data/brats18_dev.csv --modality T1 \
        --models intensity-t1 normative-t1-ixi --two-sided [--json results.json]
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from BrainAnomalyLib.evaluation.metrics import average_precision, best_dice  # noqa: E402
from BrainAnomalyLib.io import read_volume  # noqa: E402
from BrainAnomalyLib.manifest import read_manifest  # noqa: E402
from BrainAnomalyLib.models import resolve_model  # noqa: E402
from BrainAnomalyLib.pipeline import Detector  # noqa: E402
from BrainAnomalyLib.preprocess.chain import preprocess, to_native  # noqa: E402
from BrainAnomalyLib.progress import Reporter  # noqa: E402


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
    first = next(iter(detectors.values()))
    pooled = {k: ([], []) for k in detectors}
    per_case = {k: {} for k in detectors}
    for case in cases:
        t = time.perf_counter()
        scan = read_volume(case.image)
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(case.mask))) > 0
        pre = preprocess(scan, first.preprocess_config, first.grid, False, Reporter())
        brain = pre.native_mask
        for key, det in detectors.items():
            cleaned = det.score_grid(pre.image, pre.mask).clean_map
            heat = sitk.GetArrayFromImage(to_native(cleaned, pre, scan))[brain]
            pooled[key][0].append(heat)
            pooled[key][1].append(truth[brain])
            per_case[key][case.subject] = round(average_precision(heat, truth[brain]), 4)
        print(f"{case.subject}: lesion {truth.sum() / 1000:.1f} mL of {brain.sum() / 1000:.0f} mL brain, "
              f"{time.perf_counter() - t:.1f} s", file=sys.stderr)

    rows = []
    for key in detectors:
        scores, labels = np.concatenate(pooled[key][0]), np.concatenate(pooled[key][1])
        bd, bt = best_dice(scores, labels)
        rows.append({"scorer": key, "AUPRC": round(average_precision(scores, labels), 4),
                     "best_dice": round(bd, 4), "best_dice_threshold": round(bt, 4),
                     "prevalence": round(float(labels.mean()), 4), "per_case_AUPRC": per_case[key]})
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

"""Contrast recognition and scan-sanity measures on real and synthetic scans: a confusion table and the
distribution of every measure (what preprocess/contrast.py and preprocess/sanity.py take their limits from).

    python scripts/contrast_confusion.py ../shared/data/brats18_dev.csv ../shared/data/ixi_t1_2mm.csv \
        --synthetic --json contrast_features.json

Each scan goes through the detection preprocessing once (store/cache.py keeps the grid volume and the record, so a
second run only reads); --cached-only skips scans not in the cache yet.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from BrainAnomalyLib.core.errors import BadInputError  # noqa: E402
from BrainAnomalyLib.core.manifest import read_manifest  # noqa: E402
from BrainAnomalyLib.core.template import Grid  # noqa: E402
from BrainAnomalyLib.preprocess.chain import PreprocessConfig  # noqa: E402
from BrainAnomalyLib.preprocess.contrast import (CONTRASTS, MIN_MARGIN, compatible,  # noqa: E402
                                               contrast_features, recognise)
from BrainAnomalyLib.preprocess.sanity import LIMITS, judge, recorded_scaling_ratio, scan_measures  # noqa: E402
from BrainAnomalyLib.store.cache import cache_key, cached_preprocessing, default_cache_dir  # noqa: E402

SYNTH_NOISE = (0.01, 0.03, 0.06)


def real_rows(manifests, cached_only: bool):
    config, grid = PreprocessConfig(), Grid()
    for manifest in manifests:
        for case in read_manifest(manifest):
            if cached_only and not (default_cache_dir() / f"{cache_key(case.image, config, grid)}.npz").is_file():
                continue
            try:
                raw, mask, record = cached_preprocessing(case.image, config, grid)
            except BadInputError as exc:
                yield {"scan": case.key, "set": Path(manifest).stem, "true": case.modality, "error": str(exc)}
                continue
            brain_ml = next((s.get("brain_ml") for s in record or [] if s["step"] == "skull-strip"), np.nan)
            sanity = scan_measures(raw, mask, grid, brain_ml)
            ratio = recorded_scaling_ratio(record or [])
            if ratio is not None:
                sanity["scaling_ratio"] = ratio
            yield {"scan": case.key, "set": Path(manifest).stem, "true": case.modality,
                   "features": contrast_features(raw, mask, grid), "sanity": sanity}


def synthetic_rows():
    from BrainAnomalyLib.synth.appearance import TISSUE_SIGNAL, render_contrast
    from BrainAnomalyLib.synth.tissue import TissueMaps

    grid = Grid()
    tissue = TissueMaps.from_template(grid)
    for modality in TISSUE_SIGNAL:
        for k, noise in enumerate(SYNTH_NOISE):
            image = render_contrast(tissue, modality, noise=noise, seed=k)
            yield {"scan": f"template_{modality}_noise{noise:g}", "set": "synthetic", "true": modality,
                   "features": contrast_features(image, tissue.brain, grid),
                   "sanity": scan_measures(image, tissue.brain, grid, float(tissue.brain.sum()) * 8e-3)}


def confusion(rows) -> str:
    table = defaultdict(Counter)
    for r in rows:
        table[(r["set"], r["true"])][r["pred"]] += 1
    cols = list(CONTRASTS)
    lines = ["| set | true \\ recognised | " + " | ".join(cols) + " | n | correct or compatible |",
             "|---|---|" + "---|" * (len(cols) + 2)]
    for (s, true), counts in sorted(table.items()):
        n = sum(counts.values())
        ok = sum(v for c, v in counts.items() if compatible(c, true))
        lines.append(f"| {s} | {true} | " + " | ".join(str(counts.get(c, 0)) for c in cols) + f" | {n} | {ok}/{n} |")
    return "\n".join(lines)


def spread(values) -> str:
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], float)
    if v.size == 0:
        return "n=0"
    q = np.percentile(v, [0, 5, 50, 95, 100])
    return f"n={v.size} min {q[0]:.3g} p5 {q[1]:.3g} median {q[2]:.3g} p95 {q[3]:.3g} max {q[4]:.3g}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("manifests", nargs="*", help="manifest CSVs (subject,modality,image,mask)")
    ap.add_argument("--synthetic", action="store_true", help="add contrasts rendered from the template's tissue maps")
    ap.add_argument("--cached-only", action="store_true", help="skip scans that are not preprocessed yet")
    ap.add_argument("--json", help="write every scan's features here")
    args = ap.parse_args(argv)
    rows = list(real_rows(args.manifests, args.cached_only))
    if args.synthetic:
        rows += list(synthetic_rows())
    good = [r for r in rows if "error" in r and print(f"refused: {r['scan']}: {r['error']}") or "error" not in r]
    for r in good:
        est = recognise(r["features"])
        r.update(pred=est.contrast, margin=round(est.margin, 4), runner_up=est.runner_up,
                 margins={k: round(v, 4) for k, v in est.margins.items()})
    print(confusion(good))
    print(f"\nunclear (margin < {MIN_MARGIN} IQR; refused unless both sides fit the model): "
          + (", ".join(f"{r['scan']} ({r['pred']}, {r['margin']:.2f} from {r['runner_up']})" for r in good
                       if r["margin"] < MIN_MARGIN) or "none"))
    wrong = [r for r in good if not compatible(r["pred"], r["true"])]
    print("wrong: " + (", ".join(f"{r['scan']} -> {r['pred']} (margin {r['margin']:.2f})" for r in wrong) or "none"))
    print("\nfeatures (brain IQRs from the brain median; tissue levels of the hemisphere with the more uniform WM) by "
          "set and true contrast:")
    for key in sorted({(r["set"], r["true"]) for r in good}):
        sub = [r for r in good if (r["set"], r["true"]) == key]
        print(f"  {key[0]} {key[1]}:")
        for f in ("wm", "gm", "csf", "tail", "fluid_dark", "fluid_bright"):
            print(f"    {f:<12} {spread(r['features'][f] for r in sub)}")
        print(f"    wm-gm        {spread(r['features']['wm'] - r['features']['gm'] for r in sub)}")
        print(f"    bright-dark  {spread(r['features']['fluid_bright'] - r['features']['fluid_dark'] for r in sub)}")
        print(f"    margin       {spread(r['margin'] for r in sub)}")
        for other in CONTRASTS:
            values = [r["margins"][other] for r in sub if other in r["margins"]]
            if values:
                print(f"    margin to {other:<6}{spread(values)}")
    real = [r for r in good if r["set"] != "synthetic"]
    print(f"\nsanity measures on the {len(real)} real scans (limits: refuse / note):")
    for m in list(LIMITS) + ["snr", "noise"]:
        print(f"  {m:<10} {spread(r['sanity'].get(m) for r in real)}   {LIMITS.get(m, '')}")
    refused, noted = [], []
    for r in real:
        try:
            notes = judge(r["sanity"])
        except BadInputError as exc:
            refused.append(f"{r['scan']}: {exc}")
            continue
        noted += [f"{r['scan']}: {n}" for n in notes]
    print(f"real scans the sanity limits refuse: {len(refused)}" + "".join(f"\n  {x}" for x in refused))
    print(f"notes they would get: {len(noted)}" + "".join(f"\n  {x}" for x in noted))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=float), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())

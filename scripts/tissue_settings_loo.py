#!/usr/bin/env python
"""The tissue models' settings on brats18_dev, with a leave-one-case-out number: every candidate setting scored on
the model grid, the best on all five cases, and LOO (settings chosen on four cases, the fifth scored with them,
pooled AUPRC over the five held-out maps), for the tissue scorer and for the plain intensity scorer given the same
freedom over the post-processing.

    python scripts/tissue_settings_loo.py --modality FLAIR

Candidates: the reference (`nearest` tissue, prior blur 0 or 4 mm; `extreme`, blur and plausibility 0 mm / 0.05,
0 mm / 0.2, 4 mm / 0.2; not for two-sided directions), brain-mask erosion 0 or 3 voxels, contralateral weight 0,
0.25 or 0.5, in-plane median width 1, 3 or 5 voxels. The small-lesion channel is not searched: it is off unless
--small-lesion-wm / --small-lesion-spread give it (fixed for every candidate; `tissue-flair` 1.3.0 and `tissue-t2`
1.1.0 ship 0.8 and 1.5), so the defaults give the search `tissue-flair` 1.1.0's settings came from.
`extreme` at 4 mm and 0.05 is left out: it makes grey matter possible across nearly all deep white matter
(scorers/tissue.py). Grid maps: detection's own preprocessing (cached), scoring and cleaning (clean_in_template)
functions; labels resampled onto the grid through the recorded registration. Grid AUPRC runs about 0.02 below
`evaluate`'s on each scan's own grid.
"""

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from BrainAnomalyLib.core.manifest import normalise_modality, read_manifest  # noqa: E402
from BrainAnomalyLib.core.template import Grid  # noqa: E402
from BrainAnomalyLib.detection.postprocess import (PostprocessConfig, clean_in_template, clip_to_mask,  # noqa: E402
                                                   erode_mask)
from BrainAnomalyLib.evaluation.metrics import average_precision  # noqa: E402
from BrainAnomalyLib.preprocess.chain import PreprocessConfig, standardise  # noqa: E402
from BrainAnomalyLib.scorers.base import direction_for, signed  # noqa: E402
from BrainAnomalyLib.scorers.tissue import extreme_reference_score, tissue_score  # noqa: E402
from BrainAnomalyLib.store.cache import cached_preprocessing  # noqa: E402

DEV = ROOT.parent / "shared" / "data" / "brats18_dev.csv"
EXTREME = ((0.0, 0.05), (0.0, 0.2), (4.0, 0.2))
EROSIONS = (0, 3)
WEIGHTS = (0.0, 0.25, 0.5)
# In-plane median filter widths (grid voxels, 2 mm): 5 (10 mm) erases lesions smaller than about 6 mm
# (scripts/robustness_flair.py), so narrower ones are candidates too.
MEDIANS = (1, 3, 5)


def grid_case(case, grid: Grid):
    """(standardised grid image, brain mask, lesion labels on the grid) of one dev case."""
    pre_config = PreprocessConfig()
    raw, mask, record = cached_preprocessing(case.image, pre_config, grid)
    reg = next(s for s in record if s["step"] == "register")["transform"]
    t = sitk.AffineTransform(3)
    t.SetMatrix(reg["matrix"])
    t.SetTranslation(reg["translation"])
    t.SetCenter(reg["center"])
    labels = sitk.DICOMOrient(sitk.ReadImage(str(case.mask)), "RAS")  # the chain registers the RAS-oriented scan
    on_grid = sitk.Resample(labels, grid.reference(), t, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return standardise(raw, mask, pre_config, grid)[0], mask, sitk.GetArrayFromImage(on_grid) > 0


def raw_maps(image, mask, direction, grid):
    inside = image[mask]
    p25, p50, p75 = np.percentile(inside, [25, 50, 75])
    out = {("intensity",): np.where(mask, signed((image - p50) / max(float(p75 - p25), 1e-6), direction), 0.0)}
    for blur in (0.0, 4.0):
        out[("nearest", blur)] = tissue_score(image, mask, direction, grid, blur)
    if direction != "two-sided":
        for blur, plausible in EXTREME:
            out[("extreme", blur, plausible)] = extreme_reference_score(image, mask, direction, grid, blur, plausible)
    return out


def pooled(maps, cases, keys):
    return average_precision(np.concatenate([maps[k][cases[k][1]] for k in keys]),
                             np.concatenate([cases[k][2][cases[k][1]] for k in keys]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modality", required=True)
    ap.add_argument("--direction", help="default: the contrast's (scorers.direction_for)")
    ap.add_argument("--manifest", type=Path, default=DEV)
    ap.add_argument("--small-lesion-wm", type=float, default=0.0,
                    help="the small-lesion channel's white-matter level for every candidate (0: off)")
    ap.add_argument("--small-lesion-spread", type=float, default=0.0,
                    help="its margin in neighbourhood spreads (0: none)")
    args = ap.parse_args()
    modality = normalise_modality(args.modality)
    direction = args.direction or direction_for(modality)
    grid = Grid()
    cases = {c.subject: grid_case(c, grid) for c in read_manifest(args.manifest)
             if c.modality == modality and c.mask is not None}
    if len(cases) < 2:
        raise SystemExit(f"need at least two {modality} lesion cases in {args.manifest}")
    cleaned = {}
    for subject, (image, mask, _) in cases.items():
        for scorer, raw in raw_maps(image, mask, direction, grid).items():
            for weight in WEIGHTS:
                for median in MEDIANS:
                    # The dev scans are 1 mm, so the channel's margin is not diluted (acquisition_mm None).
                    config = PostprocessConfig(median_size=median, contralateral=weight,
                                               small_lesion_wm=args.small_lesion_wm,
                                               small_lesion_spread=args.small_lesion_spread)
                    clean = clean_in_template(raw.astype(np.float32), mask, config, grid)
                    for erosion in EROSIONS:  # the cleaning does not depend on it, only the clipping
                        cleaned.setdefault((scorer, erosion, weight, median), {})[subject] = clip_to_mask(
                            clean, erode_mask(mask, replace(config, erode_voxels=erosion)))
        print(f"scored {subject}", flush=True)
    keys = list(cases)
    everyone = {setting: pooled(maps, cases, keys) for setting, maps in cleaned.items()}
    print(f"\n{modality} ({direction}), {len(keys)} cases, grid AUPRC pooled; best settings on all cases:")
    for setting in sorted(everyone, key=everyone.get, reverse=True)[:8]:
        print(f"  {everyone[setting]:.3f}  {setting}")
    for median in MEDIANS:
        best = max((s for s in everyone if s[3] == median and s[0][0] != "intensity"), key=everyone.get)
        print(f"  median width {median}: best tissue setting {everyone[best]:.3f} {best}")
    families = (("tissue", lambda s: s[0][0] != "intensity"), ("intensity", lambda s: s[0][0] == "intensity"))
    for family, member in families:
        held = {}
        for k in keys:
            rest = [j for j in keys if j != k]
            best = max((s for s in cleaned if member(s)), key=lambda s: pooled(cleaned[s], cases, rest))
            held[k] = cleaned[best][k]
            print(f"  {family}: held out {k}, chose {best}")
        print(f"{family} scorer: leave-one-case-out pooled AUPRC {pooled(held, cases, keys):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

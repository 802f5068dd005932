#!/usr/bin/env python
"""How far each contrast's own registration lands from its session's T1 registration, on a manifest whose subjects
have several contrasts in one physical space (BraTS co-registers T1, T1CE, T2 and FLAIR): with no ground-truth
transform, the T1's (the contrast the template is) is the reference, and a contrast registered alone should land
where it does. Per scan: the mean and largest distance (mm) between where the two transforms put the template
brain's voxels, the registration's scaling ratio (smallest / largest stretch, preprocess/sanity.py) and the sanity
notes or refusal detection would give. Each scan is preprocessed once through the cache, as detection does.

    python scripts/registration_consistency.py ../shared/data/brats18_dev.csv
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from BrainAnomalyLib.core.errors import BadInputError  # noqa: E402
from BrainAnomalyLib.core.manifest import read_manifest  # noqa: E402
from BrainAnomalyLib.core.template import Grid, brain_mask_on_grid  # noqa: E402
from BrainAnomalyLib.preprocess.chain import PreprocessConfig  # noqa: E402
from BrainAnomalyLib.preprocess.register import affine_from_dict  # noqa: E402
from BrainAnomalyLib.preprocess.sanity import scaling_ratio  # noqa: E402
from BrainAnomalyLib.store.cache import cached_preprocessing  # noqa: E402

REFERENCE = "T1"
# Every this many template-brain voxels of the grid are compared (a regular subsample: about 25,000 points).
STRIDE = 7


def template_points(grid: Grid) -> np.ndarray:
    ref = grid.reference()
    idx = np.argwhere(brain_mask_on_grid(grid))[::STRIDE]
    return np.array([ref.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]]) for p in idx])


def registration(path, config: PreprocessConfig, grid: Grid):
    """(transform, record) of the scan's preprocessing, or (None, the refusal) when detection would refuse it."""
    try:
        _, _, record = cached_preprocessing(path, config, grid)
    except BadInputError as exc:
        return None, str(exc)
    step = next(s for s in record if s["step"] == "register")
    return affine_from_dict(step["transform"]), record


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("manifest", type=Path)
    args = ap.parse_args()
    config, grid = PreprocessConfig(), Grid()
    points = template_points(grid)
    subjects = defaultdict(dict)
    for case in read_manifest(args.manifest):
        subjects[case.subject][case.modality] = case.image
    print("| subject | contrast | mean / max distance to the T1's (mm) | scaling ratio | detection says |")
    print("|---|---|---|---|---|")
    for subject, scans in sorted(subjects.items()):
        if REFERENCE not in scans:
            continue
        t1, _ = registration(scans[REFERENCE], config, grid)
        if t1 is None:
            print(f"| {subject} | {REFERENCE} | – | – | refused |")
            continue
        where = np.array([t1.TransformPoint(p) for p in points])
        for modality, path in sorted(scans.items()):
            if modality == REFERENCE:
                continue
            transform, record = registration(path, config, grid)
            if transform is None:
                print(f"| {subject} | {modality} | – | – | refused: {record} |")
                continue
            distance = np.linalg.norm(np.array([transform.TransformPoint(p) for p in points]) - where, axis=1)
            sanity = next(s for s in record if s["step"] == "sanity")
            said = "; ".join(sanity.get("notes", [])) or "scored"
            print(f"| {subject} | {modality} | {distance.mean():.2f} / {distance.max():.2f} | "
                  f"{scaling_ratio(transform.GetMatrix()):.3f} | {said} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

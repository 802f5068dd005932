#!/usr/bin/env python
"""Do the benchmark's synthetic lesions stand out of the scans at all? Ranks each lesion scan's own voxel
intensities (per-scan median/IQR units, the lesions' side first) over the brain mask of the model's preprocessing,
and over the voxels of it deeper than 3 mm, and prints the pooled AUPRC beside the lesion prevalence: what any
voxel-wise intensity ranking reaches with nothing cleaned. Reads the synthetic set `scripts/benchmark.py` made
(and its preprocessing cache: run the benchmark first).

    python scripts/raw_ceiling.py --kind ms --kind blob-hypo
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from BrainAnomalyLib.core.errors import BadInputError  # noqa: E402
from BrainAnomalyLib.core.manifest import read_manifest  # noqa: E402
from BrainAnomalyLib.detection.pipeline import Detector  # noqa: E402
from BrainAnomalyLib.evaluation.metrics import average_precision, intensity_ranking  # noqa: E402
from BrainAnomalyLib.store.cache import cached_preprocessed, default_cache_dir  # noqa: E402
from BrainAnomalyLib.store.models import resolve_model  # noqa: E402
from BrainAnomalyLib.synth import KINDS, kept_cohort  # noqa: E402
from BrainAnomalyLib.training.run import split_subjects  # noqa: E402

DEPTH_MM = 3.0
# Lesion kinds darker than the tissue they replace on T1 (the rest are brighter or mixed: ranked brighter first).
DARK_ON_T1 = {"ms", "blob-hypo", "stroke", "tumour"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kind", action="append", required=True, help="lesion kind (repeatable), e.g. ms")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--synth-subjects", type=int, default=4, help="as given to scripts/benchmark.py")
    ap.add_argument("--synth", type=Path, help="a synthetic set's folder (default: the benchmark's, for this code)")
    ap.add_argument("--model", default=None, help="whose preprocessing gives the brain mask (default model)")
    args = ap.parse_args()
    if args.synth is None:
        held_out = split_subjects(read_manifest(args.data / "ixi_t1_2mm.csv", "T1"))["test"][:args.synth_subjects]
        try:
            args.synth = kept_cohort(held_out, default_cache_dir().parent / "benchmark-synth", "T1", KINDS,
                                     build=False)
        except BadInputError as e:
            raise SystemExit(f"{e}: run scripts/benchmark.py first")
    det = Detector(resolve_model(args.model), device="cpu")
    print("| kind | scans | lesion prevalence | AUPRC, brain | AUPRC, deeper than 3 mm |")
    print("|---|---|---|---|---|")
    for kind in args.kind:
        sign = -1.0 if kind in DARK_ON_T1 else 1.0
        scores, labels, deep = [], [], []
        images = sorted(args.synth.glob(f"*_{kind}.nii.gz"))
        if not images:
            raise SystemExit(f"no '{kind}' scans in {args.synth}: run scripts/benchmark.py first")
        for path in images:
            image = sitk.ReadImage(str(path), sitk.sitkFloat32)
            lesion = sitk.GetArrayFromImage(sitk.ReadImage(str(path).replace(".nii.gz", "_mask.nii.gz"))) > 0
            brain = cached_preprocessed(path, image, det.preprocess_config, det.grid).native_mask
            z = intensity_ranking(sitk.GetArrayFromImage(image), brain, sign)
            depth = ndimage.distance_transform_edt(brain, sampling=list(reversed(image.GetSpacing())))
            scores.append(z[brain])
            labels.append(lesion[brain])
            deep.append(depth[brain] > DEPTH_MM)
        s, lab, d = np.concatenate(scores), np.concatenate(labels), np.concatenate(deep)
        print(f"| {kind} | {len(images)} | {lab.mean():.5f} | {average_precision(s, lab):.4f} | "
              f"{average_precision(s[d], lab[d]):.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

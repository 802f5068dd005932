#!/usr/bin/env python
"""Write a tissue-aware intensity model (scorers/tissue.py) for a contrast without a healthy cohort, calibrated on
synthetic healthy scans made from the template's tissue maps.

    python scripts/make_tissue_model.py --modality FLAIR -o build/models/tissue-flair

The scorer needs no training. Its thresholds come from N_SCANS synthetic healthy scans of the contrast
(synth.appearance.healthy_template_scan): the template's GM/WM/CSF maps shifted by up to 2 mm (the misregistration
an affine leaves), rendered with the contrast's textbook tissue signals, a smooth bias field and Gaussian noise.
They are scored and post-processed as detection does, and their cleaned scores make the model's calibration
record (voxel table, curve, scan-adaptive reference and finding calibration) through the same code as
`brainanomaly calibrate`. On a real scan the scan-adaptive move then carries the thresholds onto the scan's own
cleaned-score median and spread, so what the synthetic scans fix is the shape of the healthy tail in robust units,
not its location or width. A site with healthy scans of the contrast replaces this calibration with
`brainanomaly calibrate --model tissue-flair --manifest healthy.csv -o DIR`.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from BrainAnomalyLib.core.manifest import normalise_modality  # noqa: E402
from BrainAnomalyLib.core.progress import Reporter  # noqa: E402
from BrainAnomalyLib.core.template import Grid  # noqa: E402
from BrainAnomalyLib.detection.postprocess import PostprocessConfig  # noqa: E402
from BrainAnomalyLib.preprocess.chain import PreprocessConfig  # noqa: E402
from BrainAnomalyLib.scorers import direction_for  # noqa: E402
from BrainAnomalyLib.store.models import load_model, save_model  # noqa: E402
from BrainAnomalyLib.synth.appearance import healthy_template_scan  # noqa: E402
from BrainAnomalyLib.training.run import base_meta, calibrate_volumes  # noqa: E402

N_SCANS = 12

# Settings chosen per contrast on the five brats18_dev cases (the hyperparameters the model card names, with
# their leave-one-case-out numbers): the tissue reference (scorers/tissue.py: `nearest` tissue, or `extreme`, the
# most lesion-like tissue the template allows), the brain-mask erosion and the weight of the mirror image
# subtracted before filtering (PostprocessConfig.contralateral). FLAIR also keeps its unfiltered map where the
# template's white matter is above 0.8 (PostprocessConfig.small_lesion_wm; candidates 0.5 / 0.7 / 0.8 / 0.9 and
# off, chosen on the dev cases' tumours and synthetic MS-like lesions together: README, "Small lesions"), less a
# margin of 1.5 local spreads there (PostprocessConfig.small_lesion_spread; candidates 0 / 1 / 1.5 / 2, chosen the
# same way). T2 takes FLAIR's two small-lesion settings as they are (none searched on T2).
SETTINGS = {
    "FLAIR": {"params": {"reference": "extreme"},
              "postprocess": {"erode_voxels": 0, "contralateral": 0.25, "small_lesion_wm": 0.8,
                              "small_lesion_spread": 1.5}},
    "T2": {"params": {"reference": "nearest"},
           "postprocess": {"erode_voxels": 0, "contralateral": 0.5, "small_lesion_wm": 0.8,
                           "small_lesion_spread": 1.5}},
    "T1CE": {"params": {"reference": "nearest"}, "postprocess": {"erode_voxels": 3, "contralateral": 0.5}},
}

# A contrast's model version moves when its scoring does: FLAIR 1.1.0 takes the tissue levels from inside the
# template's brain and lets any tissue be beyond it (scorers/tissue.py, extreme_reference_score).
# 1.2.0 keeps small lesions in deep white matter (detection.postprocess.small_lesions); 1.3.0 only what clears
# their neighbourhood's spread (detection.postprocess.small_lesion_margin). T2 1.1.0 takes both.
VERSIONS = {"FLAIR": "1.3.0", "T2": "1.1.0"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modality", required=True)
    ap.add_argument("-o", "--output", required=True, type=Path)
    args = ap.parse_args()
    modality = normalise_modality(args.modality)
    grid = Grid()
    chosen = SETTINGS.get(modality, {})
    against = ("the most lesion-like of the grey matter, white matter and CSF" if
               chosen.get("params", {}).get("reference") == "extreme" else "the grey matter, white matter and CSF")
    meta = base_meta("tissue", args.output.name, modality,
                     f"tissue-aware intensity scorer for {modality}: each voxel against {against} the registered "
                     "template allows there, at this scan's own tissue levels; no "
                     f"healthy cohort: thresholds calibrated on {N_SCANS} synthetic healthy {modality} scans made "
                     "from the template's tissue maps and moved to each scan's own score distribution "
                     "(scan-adaptive); calibrate on your own healthy scans where you have them",
                     grid, PreprocessConfig(), PostprocessConfig(**chosen.get("postprocess", {})),
                     {"direction": direction_for(modality), **chosen.get("params", {})})
    meta["version"] = VERSIONS.get(modality, meta["version"])
    meta["training_data"] = {"manifest": f"none (no training; calibrated on {N_SCANS} synthetic template scans)"}
    save_model(args.output, meta)
    volumes = ((f"synthetic-{modality.lower()}-{seed}", *healthy_template_scan(modality, seed, grid))
               for seed in range(N_SCANS))
    meta["calibration"] = calibrate_volumes(load_model(args.output), volumes, Reporter())
    meta["calibration"]["method"] += (f"; synthetic healthy {modality} scans from the template tissue maps "
                                      "(scripts/make_tissue_model.py)")
    save_model(args.output, meta)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

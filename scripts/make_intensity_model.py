#!/usr/bin/env python
"""Write an intensity-scorer model (Meissen et al. 2021) for a contrast that has no healthy cohort here.

    python scripts/make_intensity_model.py --modality FLAIR -o build/models/intensity-flair

The scorer needs no training (a voxel's robust z-score against its own scan's brain), but its thresholds would
come from healthy scans of that contrast, which this project does not have for FLAIR or T2. The model is written
uncalibrated, with a default threshold of 2.0 robust units (IQR) and says so in its description; a site with
healthy scans calibrates it with `brainanomaly calibrate --model intensity-flair --manifest healthy.csv -o DIR`.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from BrainAnomalyLib.core.manifest import normalise_modality  # noqa: E402
from BrainAnomalyLib.store.models import save_model  # noqa: E402
from BrainAnomalyLib.detection.postprocess import PostprocessConfig  # noqa: E402
from BrainAnomalyLib.preprocess.chain import PreprocessConfig  # noqa: E402
from BrainAnomalyLib.scorers import direction_for  # noqa: E402
from BrainAnomalyLib.core.template import Grid  # noqa: E402
from BrainAnomalyLib.training.run import base_meta  # noqa: E402

DEFAULT_THRESHOLD = 2.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modality", required=True)
    ap.add_argument("-o", "--output", required=True, type=Path)
    args = ap.parse_args()
    modality = normalise_modality(args.modality)
    name = args.output.name
    meta = base_meta("intensity", name, modality,
                     f"intensity scorer for {modality} (Meissen et al. 2021), UNCALIBRATED: no healthy {modality} "
                     f"cohort was available, so the threshold is a default ({DEFAULT_THRESHOLD} robust units above "
                     "the scan's brain median), not a measured false-positive rate; calibrate on your own healthy "
                     "scans", Grid(), PreprocessConfig(), PostprocessConfig(), {"direction": direction_for(modality)})
    meta["default_threshold"] = DEFAULT_THRESHOLD
    meta["training_data"] = {"manifest": "none (no training; uncalibrated)"}
    save_model(args.output, meta)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Compare finding scores for the lesion-level operating point (what calibration/findings.py chose excess mass by).

For each model: the findings at the 1 % base threshold of the IXI calibration split (model grid) calibrate each
candidate score the same way (FindingCalibration: conservative healthy rate); at 0.5 and 2 false findings per
healthy scan, it prints how many brats18_dev T1 patients have their tumour among the reported findings (native
grid, any overlap), the false findings per brats18_dev scan, and the findings per held-out IXI scan (test split,
model grid; `brainanomaly evaluate` measures the same through the whole detection path).

    python scripts/finding_scores.py [--data ../shared/data] [--model ensemble-t1-ixi ...]
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from BrainAnomalyLib.calibration.findings import BASE_FPR, FindingCalibration, FindingRule, strength  # noqa: E402,E501
from BrainAnomalyLib.core.io import read_volume  # noqa: E402
from BrainAnomalyLib.core.manifest import read_manifest  # noqa: E402
from BrainAnomalyLib.core.progress import Reporter  # noqa: E402
from BrainAnomalyLib.detection.pipeline import Detector  # noqa: E402
from BrainAnomalyLib.detection.postprocess import ijk_to_ras, label_array  # noqa: E402
from BrainAnomalyLib.preprocess.chain import to_native  # noqa: E402
from BrainAnomalyLib.store.cache import cases_on_grid  # noqa: E402
from BrainAnomalyLib.store.models import resolve_model  # noqa: E402
from BrainAnomalyLib.training.run import split_subjects  # noqa: E402

SCORES = ("excess mass", "peak strength", "volume")


def findings(heat, index_to_ras, curve, min_ml, truth=None):
    """[(excess mass, peak strength, volume mL, touches the truth)] of the findings at the base threshold, cut and
    scored by detection's own label_array and FindingRule."""
    numbered, lesions = label_array(heat, index_to_ras, curve.threshold(BASE_FPR), min_ml, numbered=True,
                                    rule=FindingRule(curve))
    hit = set(np.unique(numbered[truth]).tolist()) if truth is not None else set()
    peaks = strength(curve, np.array([les["max_score"] for les in lesions]))
    return [(les["finding_score"], peak, les["volume_ml"], les["label"] in hit) for les, peak in zip(lesions, peaks)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--model", action="append")
    args = ap.parse_args()
    ixi = split_subjects([c for c in read_manifest(args.data / "ixi_t1_2mm.csv", "T1") if c.mask is None])
    brats = read_manifest(args.data / "brats18_dev.csv", "T1")
    print("| model | finding score | 0.5: patients, FF/brats scan | FF/held-out IXI scan | 2: patients, FF/brats "
          "scan | FF/held-out IXI scan |\n|---|---|---|---|---|---|")
    for name in args.model or ["ensemble-t1-ixi", "dpa-t1-ixi", "normative-t1-ixi"]:
        det = Detector(resolve_model(name), device="cpu")
        min_ml, grid_to_ras = det.postprocess_config.min_lesion_ml, np.diag(list(det.grid.spacing) + [1.0])
        healthy = {}
        for split in ("calibration", "test"):
            healthy[split] = []
            for _, image, mask in cases_on_grid(ixi[split], det.preprocess_config, det.grid, Reporter()):
                scores = det.score_grid(image, mask)
                healthy[split].append(findings(scores.clean_map, grid_to_ras, det.scan_curve(scores), min_ml))
        lesion = []
        for case in brats:
            scan = read_volume(case.image)
            an = det.analyse(scan)
            heat = sitk.GetArrayFromImage(to_native(an.clean_map, an.pre, scan)) * an.pre.native_mask
            truth = sitk.GetArrayFromImage(sitk.ReadImage(str(case.mask))) > 0
            lesion.append(findings(heat, ijk_to_ras(scan), det.scan_curve(an), min_ml, truth))
        for k, score in enumerate(SCORES):
            cal = FindingCalibration.from_scans([[f[k] for f in scan] for scan in healthy["calibration"]])
            cells = []
            for target in (0.5, 2.0):
                cut = cal.threshold(target)
                reported = [[f for f in scan if f[k] >= cut] for scan in lesion]
                found = sum(any(f[3] for f in scan) for scan in reported)
                false = np.mean([sum(not f[3] for f in scan) for scan in reported])
                held = np.mean([sum(f[k] >= cut for f in scan) for scan in healthy["test"]])
                cells += [f"{found}/{len(lesion)}, {false:.1f}", f"{held:.2f}"]
            print(f"| {name} | {score} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

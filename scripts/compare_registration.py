"""How close the torch affine registration (`registration: torch`, preprocess.torch_register) comes to the SimpleITK
one (`registration: affine`) on real scans, and how long each takes.

For each scan: orient, skull-strip as detection does, then both registrations of the same stripped scan (N4 is
left out: both get the same input, and it would only add minutes here). Reports the Dice of the scan's brain mask
carried onto the model grid by either transform (the issue's bound: >= 0.98), the mean distance between where the
two transforms put the template brain's voxels, and the seconds of each. SimpleITK runs on the CPU; torch on
--device. --ixi 0 leaves the IXI scans out (they need deepbet's skull-strip, which a GPU host may not have).

  python scripts/compare_registration.py --device cpu [--ixi 3] [--out build/compare_registration.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from BrainAnomalyLib.core.io import read_volume  # noqa: E402
from BrainAnomalyLib.core.progress import Reporter  # noqa: E402
from BrainAnomalyLib.core.template import Grid, brain_mask_on_grid, template_on_grid  # noqa: E402
from BrainAnomalyLib.preprocess.register import register_affine  # noqa: E402
from BrainAnomalyLib.preprocess.skullstrip import brain_mask  # noqa: E402
from BrainAnomalyLib.preprocess.torch_grid import affine_matrix, image_matrix  # noqa: E402
from BrainAnomalyLib.preprocess.torch_register import as_sitk_affine, register_affine_torch  # noqa: E402
from BrainAnomalyLib.preprocess.working_scale import working_copy  # noqa: E402

DICE_BOUND = 0.98


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def scans(brats: Path, ixi: Path, n_ixi: int) -> list:
    out = []
    for manifest, limit in ((brats, None), (ixi, n_ixi)):
        if limit == 0:
            continue
        with open(manifest) as fh:
            rows = [r for r in csv.DictReader(fh) if r["modality"].upper() == "T1"][:limit]
        out += [(r["subject"], (manifest.parent / r["image"]).resolve()) for r in rows]
    return out


def grid_mask(mask: np.ndarray, like: sitk.Image, transform, grid: Grid) -> np.ndarray:
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.CopyInformation(like)
    return sitk.GetArrayFromImage(sitk.Resample(img, grid.reference(), transform, sitk.sitkNearestNeighbor, 0,
                                                sitk.sitkUInt8)).astype(bool)


def compare(path: Path, grid: Grid, device: str) -> dict:
    work = sitk.DICOMOrient(read_volume(path), "RAS")
    mask, _ = brain_mask(work, "auto", device.startswith("cuda"), Reporter())
    arr = sitk.GetArrayFromImage(work)
    stripped = sitk.GetImageFromArray(np.where(mask, arr, 0).astype(np.float32))
    stripped.CopyInformation(work)
    fixed, fixed_mask = template_on_grid(grid), brain_mask_on_grid(grid)
    # Each registration as the chain calls it (preprocess.chain): SimpleITK's coarse levels on the binned working
    # copy and its last level on the scan's voxels; torch's on the working copy (the binning is counted in its time).
    t = time.perf_counter()
    small, small_mask = working_copy(stripped, mask, min(grid.spacing))
    ref_transform, _ = register_affine(stripped, mask, fixed, fixed_mask, Reporter(), coarse=(small, small_mask))
    sitk_s = time.perf_counter() - t
    if device.startswith("cuda"):
        register_affine_torch(small, small_mask, fixed, fixed_mask, device)  # warm-up: kernels, allocator
    t = time.perf_counter()
    small, small_mask = working_copy(stripped, mask, min(grid.spacing))
    matrix, info = register_affine_torch(small, small_mask, fixed, fixed_mask, device)
    torch_s = time.perf_counter() - t
    a = grid_mask(mask, work, ref_transform, grid)
    b = grid_mask(mask, work, as_sitk_affine(matrix), grid)
    dice = 2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)
    kji = np.argwhere(fixed_mask)
    ijk1 = np.c_[kji[:, ::-1], np.ones(len(kji))] @ image_matrix(fixed).T
    gap = np.linalg.norm((ijk1 @ affine_matrix(ref_transform).T - ijk1 @ matrix.T)[:, :3], axis=1)
    return {"dice": round(float(dice), 4), "mean_distance_mm": round(float(gap.mean()), 3),
            "max_distance_mm": round(float(gap.max()), 3), "sitk_seconds": round(sitk_s, 2),
            "torch_seconds": round(torch_s, 2), "torch_ncc_per_level": info["ncc_per_level"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--brats", type=Path, default=SHARED / "brats18_dev.csv", help="its T1 rows are compared")
    p.add_argument("--ixi-manifest", type=Path, default=SHARED / "ixi_t1_2mm.csv")
    p.add_argument("--ixi", type=int, default=3, help="how many IXI scans (the manifest's first)")
    p.add_argument("--out", type=Path, default=Path("build/compare_registration.json"))
    args = p.parse_args()
    grid = Grid()
    rows = {}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for subject, path in scans(args.brats, args.ixi_manifest, args.ixi):
        rows[subject] = compare(path, grid, args.device)
        print(subject, json.dumps(rows[subject]), flush=True)
        # Written after every scan, so a run cut short (a device call's time limit) keeps what it measured.
        dice = [r["dice"] for r in rows.values()]
        summary = {"device": args.device, "scans": len(rows), "min_dice": min(dice), "dice_bound": DICE_BOUND,
                   "all_meet_bound": bool(min(dice) >= DICE_BOUND),
                   "median_time_ratio_torch_over_sitk": round(float(np.median(
                       [r["torch_seconds"] / r["sitk_seconds"] for r in rows.values()])), 3)}
        args.out.write_text(json.dumps({"summary": summary, "scans": rows}, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

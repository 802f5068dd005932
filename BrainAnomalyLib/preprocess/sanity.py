"""Is the scan a brain MRI that registered well? Measured on the model grid right after registration, after one
check on the input itself (check_structure: neighbouring voxels of an image vary together, those of noise do not).

  brain_ml     volume of the brain mask on the scan's own grid (skull-strip step)
  coverage     share of the template brain that the registered brain mask covers (a slab covers little)
  dice         overlap of the registered brain mask with the template brain mask
  tissue_eta2  in the template's white-matter, grey-matter and ventricle cores, the share of the intensity variance
               that which of the three a voxel lies in explains (correlation ratio): any MR contrast of a
               well-registered brain separates some of them; noise and non-brains do not, whatever their contrast
  noise        robust spread of the voxel-to-neighbourhood difference in white matter (scanner units)
  cnr          (brightest - darkest of the WM, GM, ventricle medians) / noise: tissue contrast-to-noise
  snr          brain median / noise (only where intensities are non-negative)
  scaling_ratio  the registration's smallest over its largest stretch (singular values of the affine's matrix):
               brains differ from the template in size much more than in shape, so a registration that squeezes
               one axis far more than another has stretched a part of a brain to fill the template's

What lies far outside the range of real brain scans is refused (BadInputError); what lies outside the range seen
on the development scans but not that far is kept, with a note (LIMITS).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
from scipy import ndimage

from ..core.errors import BadInputError
from ..core.template import Grid, brain_mask_on_grid, tissue_on_grid, ventricles_on_grid

# ((refuse below, above), (note below, above)); None: no limit. Set from 73 real scans of /work/shared/data (all
# 20 brats18_dev, 53 IXI T1; scripts/contrast_confusion.py, README "Input checks"), with these margins:
#   brain_ml   real 1084-1738 mL; refuse beyond 300 (skull-strip's floor) and 2500 (1.4x the largest real, above
#              any adult intracranial volume); note outside 950-2000 (0.88x the smallest, 1.15x the largest)
#   coverage   real >= 0.755 (a limited-field FLAIR), 5th percentile 0.93; refuse < 0.5 (less than half the
#              brain: a slab), note < 0.9
#   dice       real >= 0.852, 5th percentile 0.945; refuse < 0.6, note < 0.9
#   tissue_eta2  real >= 0.015, but pure noise resampled onto the grid reaches 0.008: a note only, < 0.012
#   cnr        real >= 1.86, 5th percentile 5.9; pure noise 0.21; refuse < 0.8 (2.3x under the lowest real, 3.9x
#              over noise), note < 1.5
#   scaling_ratio  (added later, measured on all 173) real 0.796-0.967 (all 153 IXI T1: 5th percentile 0.833) and
#              0.86-0.92 on 19 of the 20 brats18_dev volumes, 0.86-0.997 on 4 of them in 3, 5 and 8 mm slices and in
#              MNI space; 0.69 on the one FLAIR that holds only the front two thirds of a brain, whose registration
#              lands 17 mm from its own T1's (scripts/registration_consistency.py), 0.52-0.59 on some of its thick
#              versions; refuse < 0.6 (a 40 % squeeze: no brain's shape), note < 0.75
LIMITS = {
    "brain_ml": ((300.0, 2500.0), (950.0, 2000.0)),
    "coverage": ((0.5, None), (0.9, None)),
    "dice": ((0.6, None), (0.9, None)),
    "tissue_eta2": ((None, None), (0.012, None)),
    "cnr": ((0.8, None), (1.5, None)),
    "scaling_ratio": ((0.6, None), (0.75, None)),
}
WHAT = {"brain_ml": "brain volume (mL)", "coverage": "coverage of the template brain",
        "dice": "overlap (Dice) with the template brain", "tissue_eta2": "tissue structure (eta^2 of WM/GM/ventricles)",
        "cnr": "tissue contrast-to-noise",
        "scaling_ratio": "registration's smallest / largest stretch"}
# What a user can do about a measure beyond its limit, where there is something to say.
HINT = {"scaling_ratio": "a scan that holds only part of the brain (a limited field of view) is stretched to fill "
                         "the template: give a scan of the whole brain"}
MIN_VOXELS = 50


def _tissue_regions(region: np.ndarray, grid: Grid) -> List[np.ndarray]:
    tissue = tissue_on_grid(grid)
    return [region & (tissue["WM"] >= 0.9), region & (tissue["GM"] >= 0.6), region & ventricles_on_grid(grid)]


def _eta2(image: np.ndarray, regions: List[np.ndarray]) -> float:
    groups = [image[r].astype(np.float64) for r in regions if r.sum() >= MIN_VOXELS]
    if len(groups) < 2:
        return 0.0
    values = np.concatenate(groups)
    total = float(((values - values.mean()) ** 2).sum())
    between = sum(g.size * (g.mean() - values.mean()) ** 2 for g in groups)
    return 0.0 if total <= 0 else float(between) / total


def _noise(image: np.ndarray, region: np.ndarray) -> float:
    # Tissue is smooth within a 3-voxel white-matter neighbourhood; what differs from the neighbours' mean is
    # noise (scaled so a Gaussian's sigma comes out).
    local = ndimage.uniform_filter(image.astype(np.float64), 3)
    residual = (image - local)[region]
    if residual.size < MIN_VOXELS:
        return float("nan")
    return float(1.4826 * np.median(np.abs(residual - np.median(residual))) * np.sqrt(27.0 / 26.0))


def scan_measures(image: np.ndarray, mask: np.ndarray, grid: Grid, brain_ml: float) -> Dict[str, float]:
    """The measures above for a registered grid volume `image` (before standardisation) and its brain `mask`."""
    template = brain_mask_on_grid(grid)
    overlap = mask & template
    n_overlap = int(overlap.sum())
    out = {"brain_ml": round(float(brain_ml), 1),
           "coverage": round(n_overlap / max(int(template.sum()), 1), 4),
           "dice": round(2.0 * n_overlap / max(int(mask.sum() + template.sum()), 1), 4)}
    if n_overlap < MIN_VOXELS:
        return dict(out, tissue_eta2=0.0, noise=float("nan"), cnr=0.0, snr=None)
    regions = _tissue_regions(overlap, grid)
    out["tissue_eta2"] = round(_eta2(image, regions), 4)
    noise = _noise(image, ndimage.binary_erosion(regions[0]))
    out["noise"] = round(noise, 6)
    medians = [float(np.median(image[r])) for r in regions if r.sum() >= MIN_VOXELS]
    out["cnr"] = round((max(medians) - min(medians)) / noise, 3) if len(medians) >= 2 and noise > 0 else 0.0
    brain = image[overlap]
    out["snr"] = round(float(np.median(brain)) / noise, 3) if noise > 0 and float(brain.min()) >= 0 else None
    return out


def judge(measures: Dict[str, float]) -> List[str]:
    """Notes for borderline values; BadInputError naming every measure beyond its refusal limit."""
    refused, notes = [], []
    for name, ((lo, hi), (note_lo, note_hi)) in LIMITS.items():
        v = measures.get(name)
        if v is None or not np.isfinite(v):
            continue
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            bound = f"below {lo:g}" if lo is not None and v < lo else f"above {hi:g}"
            refused.append(f"{WHAT[name]} {v:g} is {bound}" + (f" ({HINT[name]})" if name in HINT else ""))
        elif (note_lo is not None and v < note_lo) or (note_hi is not None and v > note_hi):
            usual = " to ".join(f"{b:g}" for b in (note_lo, note_hi) if b is not None)
            side = "at least " if note_hi is None else ("at most " if note_lo is None else "")
            notes.append(f"unusual scan: {WHAT[name]} {v:g} (real brain scans: {side}{usual})"
                         + (f"; {HINT[name]}" if name in HINT else ""))
    if refused:
        raise BadInputError("this does not look like a registered brain MRI: " + "; ".join(refused))
    return notes


def scaling_ratio(matrix) -> float:
    """The smallest over the largest singular value of an affine's 3x3 matrix (row-major, 9 numbers): 1 for a
    rotation or a uniform scaling, whatever the voxel sizes (the transform maps physical points)."""
    s = np.linalg.svd(np.asarray(matrix, dtype=float).reshape(3, 3), compute_uv=False)
    return float(s.min() / s.max()) if s.max() > 0 else 0.0


def assess_scan(image: np.ndarray, mask: np.ndarray, grid: Grid, brain_ml: float,
                transform_matrix=None) -> Tuple[dict, List[str]]:
    """The measures of a registered grid volume and its brain mask (with the registration's scaling_ratio when its
    matrix is given), and judge's notes; BadInputError beyond a refusal limit."""
    measures = scan_measures(image, mask, grid, brain_ml)
    if transform_matrix is not None:
        measures["scaling_ratio"] = round(scaling_ratio(transform_matrix), 4)
    return measures, judge(measures)


def rejudge(record: List[dict]) -> List[str]:
    """judge again on a preprocessing record (a cached scan's): the recorded sanity measures, with the
    registration's scaling_ratio added where the record predates it, so a cached scan is refused or noted exactly
    as a fresh one is. Returns the notes (the record's sanity step is updated with both)."""
    sanity = next((s for s in record if s["step"] == "sanity"), None)
    if sanity is None:
        return []
    if "scaling_ratio" not in sanity:
        ratio = recorded_scaling_ratio(record)
        if ratio is not None:
            sanity["scaling_ratio"] = ratio
    sanity["notes"] = judge(sanity)
    return sanity["notes"]


def recorded_scaling_ratio(record: List[dict]) -> Optional[float]:
    """scaling_ratio of the registration a preprocessing record holds (None without one), rounded as recorded."""
    reg = next((s for s in record if s["step"] == "register"), None)
    if reg is None or "transform" not in reg:
        return None
    return round(scaling_ratio(reg["transform"]["matrix"]), 4)


# Neighbouring voxels of any MR image vary together (anatomy is smooth at the voxel's scale): the strongest of the
# three axes' correlations was 0.83-0.99 on all 173 real scans of /work/shared/data (153 IXI T1, 20 brats18_dev
# volumes), 0.85-0.996 on 2 of the latter in 3, 5 and 8 mm slices and in MNI space (scripts/robustness_flair.py's
# versions), and 0.002 on noise (Gaussian, Rician, uniform). Checked on the input before the skull-strip and
# registration, which took 15-19 s to reach the grid measures' refusal of a noise volume; smoothed noise (0.78) is
# left to those.
MIN_NEIGHBOUR_R = 0.3
# Pairs per axis the correlation is measured on (a regular subsample; the whole of a 1 mm scan took 0.1-0.8 s).
MAX_PAIRS = 500_000


def neighbour_correlation(volume: np.ndarray) -> Optional[float]:
    """The largest over the three axes of the correlation between each voxel and its next neighbour along the axis,
    over pairs where both are non-zero (a skull-stripped background of zeros would correlate with itself). None
    when no axis has enough such pairs to say."""
    best: Optional[float] = None
    for axis in range(3):
        moved = np.moveaxis(volume, axis, 0)
        if moved.shape[0] < 2:
            continue
        stride = max(1, int(np.ceil(np.sqrt(moved[1:].size / MAX_PAIRS))))
        x = moved[1:, ::stride, ::stride].astype(np.float64).ravel()
        y = moved[:-1, ::stride, ::stride].astype(np.float64).ravel()
        both = (x != 0) & (y != 0)
        if both.sum() < 1000:
            continue
        x, y = x[both] - x[both].mean(), y[both] - y[both].mean()
        denominator = float(np.sqrt((x * x).sum() * (y * y).sum()))
        r = float((x * y).sum()) / denominator if denominator > 0 else 0.0
        best = r if best is None else max(best, r)
    return best


def check_structure(volume: np.ndarray) -> Optional[float]:
    """neighbour_correlation of an input volume; BadInputError when it is that of noise."""
    r = neighbour_correlation(volume)
    if r is not None and r < MIN_NEIGHBOUR_R:
        raise BadInputError(f"this does not look like an MRI: neighbouring voxels do not vary together (correlation "
                            f"{r:.3f}; real scans 0.83 or more): noise, or no image")
    return None if r is None else round(r, 4)

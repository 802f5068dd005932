"""Tissue-aware intensity scorer: a voxel against the tissues that can be there, not against the whole brain.

The plain intensity scorer compares every voxel with the brain's median, so on FLAIR the cortex (brighter than white
matter) and on T2 the CSF of sulci and ventricles (the brightest normal signal) look like lesions. Here each voxel
is compared with the tissues the registered template says may be at that place: grey matter, white matter and CSF,
each at its own level on this very scan. Needs no healthy cohort: the levels are the scan's own robust statistics.

Per voxel, with z_c = (I - level_c) / IQR signed so lesions are positive (hyper on FLAIR and T2; IQR the brain's,
as the plain scorer's unit) and p_c the local tissue prior, the nearest tissue is c* = argmin_c d_c with
d_c = z_c^2 - 2 ln(p_c / max_k p_k), and the score is sign(z_c*) sqrt(d_c*): the distance to the most plausible
tissue, on the side where the voxel lies of it, a tissue that is rarer here than the likeliest one costing as much
as being sqrt(2 ln(max p / p_c)) further out. It is -2 ln of the best
class term of a Gaussian mixture, relative to the likeliest tissue's, so a voxel of a tissue that belongs there
scores its own robust z and partial volume between two tissues that meet there scores low.

The priors are the template's GM/WM maps (CSF the rest of the brain) on the grid, floored so no tissue is ever
impossible, and the tissue levels are refined on the scan: one EM-like step re-estimates each tissue's level from
the voxels its posterior claims and that fit it (lesions, outliers to every tissue, are left out).

A second reference (`reference: extreme`, extreme_reference_score, the FLAIR model's) holds each voxel to the most
lesion-like tissue possible there instead of the nearest: on FLAIR a lesion must outshine every tissue the template
allows at that place, not merely differ from the nearest one (brats18_dev FLAIR grid AUPRC with the model's
post-processing: 0.839 against 0.819 for the nearest reference).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from ..core.template import Grid, brain_mask_on_grid, tissue_on_grid
from .base import ScoreOutput, Scorer, register, signed

CLASSES = ("CSF", "GM", "WM")
# Blurring the priors for the registration error (mm, Gaussian sigma) and a high floor both let the brightest
# plausible tissue explain lesions. brats18_dev AUPRC (FLAIR / T2) of the score clipped at 0 (before it was signed):
# 0.788 / 0.614 at 0 mm and floor 1e-5, 0.788 / 0.600 at 1 mm and 1e-4, 0.778 / 0.525 at 2 mm and 1e-3; the signed
# score at 0 mm and 1e-5: 0.794 / 0.605. The template's maps at 2 mm are smooth already, and the
# floor still lets any tissue be anywhere at a price of about 4.8 robust units (atrophy, enlarged ventricles, mass
# effect).
PRIOR_BLUR_MM = 0.0
PRIOR_FLOOR = 1e-5
# Voxels a tissue's prior claims this surely seed its level (GM is rarely purer at 2 mm).
SEED_PROBABILITY = {"CSF": 0.9, "GM": 0.6, "WM": 0.9}
# The refinement keeps voxels whose posterior for a tissue is this sure and that lie within this many robust
# units of its level.
REFINE_POSTERIOR = 0.8
REFINE_INLIER_Z = 3.0
# A spread below this share of the brain's IQR would make every voxel of a flat tissue an outlier (noise, bias).
MIN_SPREAD_IQR = 0.1
MAD_TO_SIGMA = 1.4826
# The extreme reference (extreme_reference_score): a tissue counts as possible at a voxel where its prior, blurred
# for the misregistration an affine leaves, reaches this share. brats18_dev FLAIR grid AUPRC (erosion 0,
# contralateral 0.25): 0.846 at 4 mm and 0.05, 0.839 at 4 mm and 0.2, 0.834 at 0 mm and 0.05; but at 4 mm and 0.05
# grey matter is possible across 92 % of deep white matter, the reference is the cortex's level nearly everywhere
# and a lesion just brighter than cortex in white matter scores no higher than the cortex (the FLAIR test case:
# 26 % of cortex above the lesion's 20th percentile, 0.02 % at 4 mm and 0.2).
EXTREME_BLUR_MM = 4.0
EXTREME_PLAUSIBLE = 0.2


def _robust(values: np.ndarray) -> Tuple[float, float]:
    med = float(np.median(values))
    return med, MAD_TO_SIGMA * float(np.median(np.abs(values - med)))


def tissue_priors(mask: np.ndarray, grid: Grid = Grid(), blur_mm=PRIOR_BLUR_MM,
                  floor: float = PRIOR_FLOOR) -> Dict[str, np.ndarray]:
    """The template's tissue probabilities on the grid, blurred by `blur_mm` (a Gaussian sigma, one for all axes
    or one per axis z, y, x; none by default) and floored, normalised to sum to one inside `mask`."""
    t = tissue_on_grid(grid)
    if t["WM"].shape != mask.shape:
        raise ValueError(f"the tissue maps are on a {t['WM'].shape} grid but the scan is {mask.shape}")
    sigma = [b / s for b, s in zip(np.broadcast_to(blur_mm, 3), reversed(grid.spacing))]
    wm, gm = np.clip(t["WM"], 0, 1), np.clip(t["GM"], 0, 1)
    raw = {"CSF": np.clip(1.0 - wm - gm, 0, 1), "GM": gm, "WM": wm}
    priors = {c: ndimage.gaussian_filter(p.astype(np.float32), sigma) + floor for c, p in raw.items()}
    total = sum(priors.values())
    return {c: np.where(mask, p / total, 0.0).astype(np.float32) for c, p in priors.items()}


def tissue_levels(image: np.ndarray, mask: np.ndarray, priors: Dict[str, np.ndarray]) -> Dict[str, Tuple[float, float]]:
    """Each tissue's (level, spread) on this scan: medians and MADs where the prior is sure, then one refinement
    step on the voxels the posterior gives to each tissue that also fit it. The spreads weigh the posteriors; the
    score itself counts in the brain's IQR."""
    inside = image[mask]
    q25, q75 = np.percentile(inside, [25, 75])
    floor = MIN_SPREAD_IQR * max(float(q75 - q25), 1e-6)
    levels = {}
    for c in CLASSES:
        seed = mask & (priors[c] >= SEED_PROBABILITY[c] * (1 - 3 * PRIOR_FLOOR))
        values = image[seed] if seed.sum() >= 50 else inside
        med, spread = _robust(values)
        levels[c] = (med, max(spread, floor))
    like = {c: priors[c][mask] * np.exp(-0.5 * ((inside - m) / s) ** 2) / s for c, (m, s) in levels.items()}
    total = sum(like.values()) + 1e-30
    refined = {}
    for c, (m, s) in levels.items():
        keep = (like[c] / total >= REFINE_POSTERIOR) & (np.abs(inside - m) <= REFINE_INLIER_Z * s)
        if keep.sum() >= 50:
            med, spread = _robust(inside[keep])
            refined[c] = (med, max(spread, floor))
        else:
            refined[c] = (m, s)
    return refined


def tissue_score(image: np.ndarray, mask: np.ndarray, direction: str, grid: Grid = Grid(),
                 blur_mm: float = PRIOR_BLUR_MM, floor: float = PRIOR_FLOOR) -> np.ndarray:
    """The tissue-aware anomaly map (float32 on the grid, 0 outside `mask`)."""
    priors = tissue_priors(mask, grid, blur_mm, floor)
    levels = tissue_levels(image, mask, priors)
    inside = image[mask]
    # One unit for every tissue, the brain's IQR as the plain intensity scorer uses: with the tissues' own spread
    # (the pooled GM/WM MAD) scans stop being comparable; brats18_dev AUPRC at 2 mm and floor 1e-3 fell from
    # 0.778 to 0.753 on FLAIR and from 0.525 to 0.462 on T2.
    q25, q75 = np.percentile(inside, [25, 75])
    unit = max(float(q75 - q25), 1e-6)
    # Relative to the likeliest tissue, so a voxel that fits it scores its own z whatever the mixing.
    top = np.maximum.reduce([priors[c][mask] for c in CLASSES])
    best = side = None
    for c, (level, _) in levels.items():
        z = signed((inside - level) / unit, direction)
        cost = z ** 2 - 2.0 * np.log(priors[c][mask] / top)
        if best is None:
            best, side = cost, z
        else:
            nearer = cost < best
            best, side = np.where(nearer, cost, best), np.where(nearer, z, side)
    # Signed by the side of the nearest tissue, so healthy voxels spread around 0 and the scan-adaptive move has a
    # spread to measure.
    out = np.zeros(mask.shape, np.float32)
    out[mask] = np.sign(side) * np.sqrt(np.maximum(best, 0.0))
    return out


def acquisition_blur(blur_mm: float, grid: Grid, acquisition_mm: Optional[Sequence[float]]) -> List[float]:
    """The prior blur (Gaussian sigma, z, y, x; mm) for a scan whose voxels reach `acquisition_mm` along the grid
    axes: `blur_mm` plus, per axis, whatever the input voxel reaches beyond the grid's spacing. A thick slice
    averages tissue over its slab and registers less surely across it, so a voxel inside a ventricle's roof can
    hold white matter's signal; held to the CSF level it was a false finding (robustness_flair.py, 5 mm slices).
    Inputs no coarser than the grid (every scan on a 2 mm grid from 1-2 mm data) keep `blur_mm` exactly."""
    if acquisition_mm is None:
        return [float(blur_mm)] * 3
    return [float(blur_mm) + max(0.0, float(a) - float(s)) if blur_mm else 0.0
            for a, s in zip(acquisition_mm, reversed(grid.spacing))]


def extreme_reference_score(image: np.ndarray, mask: np.ndarray, direction: str, grid: Grid = Grid(),
                            blur_mm: float = EXTREME_BLUR_MM, plausible: float = EXTREME_PLAUSIBLE,
                            acquisition_mm: Optional[Sequence[float]] = None) -> np.ndarray:
    """The anomaly map against the most lesion-like tissue that may be at each voxel: on FLAIR (hyper) a voxel
    scores how far it is above the brightest tissue whose (blurred) prior reaches `plausible` there, in the brain's
    IQR. A lesion must outdo every tissue the template allows, not merely differ from the nearest; a CSF-only
    place (the ventricles) is held to the CSF level, so bright periventricular tissue still scores. The blur
    widens along the axes where the input's voxels are coarser than the grid (acquisition_blur)."""
    if direction not in ("hyper", "hypo"):
        raise ValueError(f"the extreme tissue reference needs a one-sided direction, not {direction!r}")
    # Beyond the template's brain the priors' CSF is only "not GM or WM": the template knows nothing there, yet the
    # scan's brain mask reaches it wherever this brain is bigger than the affine fit or its strip looser. Cortex
    # there seeded the CSF level and, held to that level, was a false finding of several mL at the brain's edge
    # (robustness_flair.py: MNI-space and thick-slice versions). So the levels come from inside the template's
    # brain, and beyond it any tissue may be.
    known = brain_mask_on_grid(grid)
    levels = tissue_levels(image, mask & known, tissue_priors(mask & known, grid))
    priors = tissue_priors(mask, grid, acquisition_blur(blur_mm, grid, acquisition_mm))
    pick = np.maximum if direction == "hyper" else np.minimum
    reference = np.full(mask.shape, -np.inf if direction == "hyper" else np.inf, np.float32)
    for c, (level, _) in levels.items():
        allowed = priors[c] >= plausible
        reference = np.where(allowed, pick(reference, level), reference)
    # With three tissues summing to one some tissue always reaches 1/3; the WM level covers plausible > 1/3.
    reference = np.where(np.isfinite(reference), reference, levels["WM"][0])
    reference = np.where(known, reference, pick.reduce([lv for lv, _ in levels.values()]))
    inside = image[mask]
    q25, q75 = np.percentile(inside, [25, 75])
    out = np.zeros(mask.shape, np.float32)
    out[mask] = signed((inside - reference[mask]) / max(float(q75 - q25), 1e-6), direction)
    return out


@register
class TissueScorer(Scorer):
    kind = "tissue"
    # Not scan_relative: the levels are the scan's own, but the spread of the scores on normal tissue still
    # differs between scans (noise, registration), so the threshold is moved to the scan's cleaned scores.

    grid = Grid()

    @classmethod
    def for_model(cls, model, params, device="cpu"):
        scorer = cls(params, model.tensors, device)
        scorer.grid = Grid.from_dict(model.meta["grid"])
        return scorer

    def score(self, image, mask, reporter):
        reporter("score", 0.0)
        p = self.params
        mask = np.asarray(mask, bool)
        reference = p.get("reference", "nearest")
        if reference == "extreme":
            out = extreme_reference_score(image, mask, p["direction"], self.grid,
                                          float(p.get("prior_blur_mm", EXTREME_BLUR_MM)),
                                          float(p.get("plausible", EXTREME_PLAUSIBLE)), self.acquisition_mm)
        elif reference == "nearest":
            out = tissue_score(image, mask, p["direction"], self.grid, float(p.get("prior_blur_mm", PRIOR_BLUR_MM)),
                               float(p.get("prior_floor", PRIOR_FLOOR)))
        else:
            raise ValueError(f"unknown tissue reference {reference!r}; choose from nearest, extreme")
        reporter("score", 1.0)
        return ScoreOutput(out)

    @classmethod
    def fit(cls, samples, params, reporter):
        # Nothing to learn: the tissue levels come from each scan itself. A healthy cohort calibrates thresholds.
        return dict(params), {}

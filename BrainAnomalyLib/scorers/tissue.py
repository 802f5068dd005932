"""Tissue-aware intensity scorer: a voxel against the tissues that can be there, not against the whole brain.

The plain intensity scorer compares every voxel with the brain's median, so on FLAIR the cortex (brighter than white
matter) and on T2 the CSF of sulci and ventricles (the brightest normal signal) look like lesions. Here each voxel
is compared with the tissues the registered template says may be at that place: grey matter, white matter and CSF,
each at its own level on this very scan. Needs no healthy cohort: the levels are the scan's own robust statistics.

Per voxel, with z_c = (I - level_c) / spread_c on the side where lesions show (hyper on FLAIR and T2, clipped at 0
on the other side) and p_c the local tissue prior, the score is sqrt(min_c (z_c^2 - 2 ln p_c)): the distance to the
most plausible tissue, a tissue that is rare at this place costing as much as being its 2 ln(1/p) further out. It
is, up to the likeliest tissue's term, -2 ln of the best class term of a Gaussian mixture, so a voxel of any tissue that belongs there scores about
its own robust z and partial volume between two tissues that meet there scores low.

The priors are the template's GM/WM maps (CSF the rest of the brain), blurred by the registration error an affine
leaves (a few mm), floored so no tissue is ever impossible, and refined on the scan: one EM-like step re-estimates
each tissue's level and spread from the voxels that its posterior claims and that fit it (lesions, outliers to
every tissue, are left out).
"""

from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
from scipy import ndimage

from ..core.template import Grid, tissue_on_grid
from .base import ScoreOutput, Scorer, register, signed

CLASSES = ("CSF", "GM", "WM")
# Typical affine registration error between a patient's brain and the template (mm, Gaussian sigma).
PRIOR_BLUR_MM = 3.0
# No tissue is ruled out anywhere: atrophy, enlarged ventricles and mass effect move tissue where the template has
# none.
PRIOR_FLOOR = 0.01
# Voxels a tissue's prior claims this surely seed its level (GM is rarely purer at 2 mm).
SEED_PROBABILITY = {"CSF": 0.9, "GM": 0.6, "WM": 0.9}
# The refinement keeps voxels whose posterior for a tissue is this sure and that lie within this many robust
# units of its level.
REFINE_POSTERIOR = 0.8
REFINE_INLIER_Z = 3.0
# A spread below this share of the brain's IQR would make every voxel of a flat tissue an outlier (noise, bias).
MIN_SPREAD_IQR = 0.1
MAD_TO_SIGMA = 1.4826


def _robust(values: np.ndarray) -> Tuple[float, float]:
    med = float(np.median(values))
    return med, MAD_TO_SIGMA * float(np.median(np.abs(values - med)))


def tissue_priors(mask: np.ndarray, grid: Grid = Grid(), blur_mm: float = PRIOR_BLUR_MM,
                  floor: float = PRIOR_FLOOR) -> Dict[str, np.ndarray]:
    """The template's tissue probabilities on the grid, blurred by the registration error and floored, normalised
    to sum to one inside `mask`."""
    t = tissue_on_grid(grid)
    if t["WM"].shape != mask.shape:
        raise ValueError(f"the tissue maps are on a {t['WM'].shape} grid but the scan is {mask.shape}")
    sigma = [blur_mm / s for s in reversed(grid.spacing)]
    wm, gm = np.clip(t["WM"], 0, 1), np.clip(t["GM"], 0, 1)
    raw = {"CSF": np.clip(1.0 - wm - gm, 0, 1), "GM": gm, "WM": wm}
    priors = {c: ndimage.gaussian_filter(p.astype(np.float32), sigma) + floor for c, p in raw.items()}
    total = sum(priors.values())
    return {c: np.where(mask, p / total, 0.0).astype(np.float32) for c, p in priors.items()}


def tissue_levels(image: np.ndarray, mask: np.ndarray, priors: Dict[str, np.ndarray]) -> Dict[str, Tuple[float, float]]:
    """Each tissue's (level, spread) on this scan: medians and MADs where the prior is sure, then one refinement
    step on the voxels the posterior gives to each tissue that also fit it."""
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
                 blur_mm: float = PRIOR_BLUR_MM, floor: float = PRIOR_FLOOR, spread: str = "common",
                 mode: str = "mixture") -> np.ndarray:
    """The tissue-aware anomaly map (float32 on the grid, 0 outside `mask`)."""
    priors = tissue_priors(mask, grid, blur_mm, floor)
    levels = tissue_levels(image, mask, priors)
    inside = image[mask]
    if spread == "iqr":
        q25, q75 = np.percentile(inside, [25, 75])
        levels = {c: (m, max(float(q75 - q25), 1e-6)) for c, (m, _) in levels.items()}
    elif spread == "common":
        common = float(np.sqrt(0.5 * (levels["GM"][1] ** 2 + levels["WM"][1] ** 2)))
        levels = {c: (m, common) for c, (m, _) in levels.items()}
    out = np.zeros(mask.shape, np.float32)
    if mode == "expected":
        like = {c: priors[c][mask] * np.exp(-0.5 * ((inside - m) / s) ** 2) for c, (m, s) in levels.items()}
        total = sum(like.values()) + 1e-30
        post = {c: np.where(total > 1e-20, like[c] / total, priors[c][mask]) for c in CLASSES}
        expected = sum(post[c] * levels[c][0] for c in CLASSES)
        out[mask] = signed((inside - expected) / levels["WM"][1], direction)
        return out
    # Relative to the likeliest tissue, so a voxel that fits it scores its own z whatever the mixing.
    top = np.maximum.reduce([priors[c][mask] for c in CLASSES])
    best = None
    for c, (m, s) in levels.items():
        z = np.maximum(signed((inside - m) / s, direction), 0.0)
        cost = z ** 2 - 2.0 * np.log(priors[c][mask] / top)
        best = cost if best is None else np.minimum(best, cost)
    out[mask] = np.sqrt(np.maximum(best, 0.0))
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
        out = tissue_score(image, np.asarray(mask, bool), p["direction"], self.grid,
                           float(p.get("blur_mm", PRIOR_BLUR_MM)), float(p.get("floor", PRIOR_FLOOR)),
                           p.get("spread", "common"), p.get("mode", "mixture"))
        reporter("score", 1.0)
        return ScoreOutput(out)

    @classmethod
    def fit(cls, samples, params, reporter):
        # Nothing to learn: the tissue levels come from each scan itself. A healthy cohort calibrates thresholds.
        return dict(params), {}

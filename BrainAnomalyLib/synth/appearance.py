"""How each synthetic tissue looks in each MRI contrast, as a target relative to the scan's own statistics.

A target is `WM median + k * brain IQR`, measured inside the brain of the very scan being edited, so the same
rule gives a sensible intensity on raw scanner units, normalised volumes or the 0..1 template alike, and one
lesion gets the right relative brightness in T1, T1CE, T2 and FLAIR. The k values follow the textbook signal
of each tissue; on T1 the WM-GM gap is about one IQR, on T2/FLAIR WM is the darkest parenchyma.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Dict, Tuple

import numpy as np

from ..core.manifest import normalise_modality
from .tissue import TissueMaps

# k (in brain IQRs above the WM median) per modality and component.
RULES: Dict[str, Dict[str, float]] = {
    "T1": {"ms": -1.0, "necrosis": -2.6, "enhancing": -0.3, "oedema": -1.2, "stroke": -1.8},
    "T1CE": {"ms": -1.0, "necrosis": -2.6, "enhancing": 2.2, "oedema": -1.2, "stroke": -1.8},
    "T2": {"ms": 2.0, "necrosis": 4.0, "enhancing": 1.0, "oedema": 2.6, "stroke": 2.6},
    "FLAIR": {"ms": 2.5, "necrosis": -0.4, "enhancing": 1.6, "oedema": 2.6, "stroke": 2.4},
}
# Contrasts without rules of their own (PD, SWI, ...) are mostly T2-like in pathology.
FALLBACK = "T2"

# Textured blobs: shift of the mean (in IQRs, drawn from the range) and texture amplitude (IQRs).
BLOB_SHIFT = {"blob-hyper": (1.5, 3.0), "blob-hypo": (-3.0, -1.5), "blob-iso": (0.0, 0.0)}
BLOB_TEXTURE = {"blob-hyper": 0.4, "blob-hypo": 0.4, "blob-iso": 1.2}
# Lesion texture (IQRs): real lesions are not flat.
LESION_TEXTURE = 0.15


@dataclass(frozen=True)
class TissueStats:
    """Robust intensity statistics of one scan, measured inside its brain."""

    wm: float  # median of likely white matter
    gm: float  # median of likely grey matter
    iqr: float  # interquartile range of the brain
    lo: float  # lowest value a lesion may take
    hi: float  # highest value a lesion may take

    def to_dict(self) -> dict:
        return {k: round(float(v), 6) for k, v in asdict(self).items()}


def tissue_stats(array: np.ndarray, tissue: TissueMaps) -> TissueStats:
    brain = array[tissue.brain]
    if brain.size == 0:
        raise ValueError("the brain mask is empty")
    p = np.percentile(brain, [0.5, 25, 75, 99.5])
    iqr = float(p[2] - p[1]) or float(np.std(brain)) or 1.0
    wm = _median_where(array, tissue.brain & (tissue.wm > 0.9), tissue.brain & (tissue.wm > 0.5), brain)
    gm = _median_where(array, tissue.brain & (tissue.gm > 0.7), tissue.brain & (tissue.gm > 0.4), brain)
    # Never below the darkest brain tissue (nor below zero on non-negative scans), and allow enhancement to
    # exceed the brightest tissue by a few IQRs, as gadolinium does.
    lo = float(p[0])
    if float(array.min()) >= 0:
        lo = max(lo, 0.0)
    return TissueStats(wm=wm, gm=gm, iqr=iqr, lo=lo, hi=float(p[3]) + 3.0 * iqr)


def _median_where(array, strict, loose, fallback) -> float:
    for region in (strict, loose):
        if region.sum() >= 20:
            return float(np.median(array[region]))
    return float(np.median(fallback))


def rule_modality(modality: str) -> str:
    m = normalise_modality(modality)
    return m if m in RULES else FALLBACK


def target(stats: TissueStats, modality: str, component: str) -> float:
    """Mean intensity of `component` (ms, necrosis, enhancing, oedema, stroke) on this scan in this contrast."""
    k = RULES[rule_modality(modality)][component]
    return float(np.clip(stats.wm + k * stats.iqr, stats.lo, stats.hi))


# Relative signal of CSF, GM and WM in each contrast (textbook orderings: T1 and T1CE WM > GM > CSF; T2 CSF >> GM > WM;
# FLAIR GM > WM > CSF; PD GM > WM, CSF close to GM), for scans made from tissue maps alone.
TISSUE_SIGNAL: Dict[str, Dict[str, float]] = {
    "T1": {"CSF": 0.25, "GM": 0.60, "WM": 0.85},
    # Healthy tissue takes up little gadolinium: a healthy T1CE has T1's tissue order and levels (its vessels and
    # choroid plexus are not in the tissue maps).
    "T1CE": {"CSF": 0.25, "GM": 0.60, "WM": 0.85},
    "T2": {"CSF": 1.00, "GM": 0.45, "WM": 0.33},
    "FLAIR": {"CSF": 0.12, "GM": 0.62, "WM": 0.48},
    "PD": {"CSF": 0.86, "GM": 0.80, "WM": 0.66},
}


def render_contrast(tissue: TissueMaps, modality: str, noise: float = 0.02, seed: int = 0,
                    scale: float = 1000.0) -> np.ndarray:
    """A skull-stripped scan in `modality` (T1, T2, FLAIR or PD) made from the tissue maps: each voxel mixes the
    tissues' signals by their probabilities, plus Gaussian noise (a share of the brightest signal); 0 outside."""
    signal = TISSUE_SIGNAL[normalise_modality(modality)]
    csf = np.clip(1.0 - tissue.wm - tissue.gm, 0.0, 1.0)
    out = signal["CSF"] * csf + signal["GM"] * tissue.gm + signal["WM"] * tissue.wm
    out = out + noise * max(signal.values()) * np.random.default_rng(seed).standard_normal(out.shape)
    return np.where(tissue.brain, np.clip(out, 0.0, None) * scale, 0.0).astype(np.float32)


# A template-made healthy scan looks like a registered patient's: its tissues sit up to a couple of mm off the
# template's (the error an affine registration leaves), under a smooth bias field and noise.
TEMPLATE_SCAN_SHIFT_MM = 2.0
TEMPLATE_SCAN_NOISE = 0.03  # share of the brightest tissue signal
TEMPLATE_SCAN_BIAS = 0.05  # peak of the log bias field
TEMPLATE_SCAN_BIAS_SMOOTH_MM = 40.0


def healthy_template_scan(modality: str, seed: int, grid) -> Tuple[np.ndarray, np.ndarray]:
    """A synthetic healthy scan in `modality` on the model `grid` (core.template.Grid), made from the template's
    tissue maps shifted by a random offset: (image z,y,x float32, template brain mask)."""
    from scipy import ndimage

    from ..core.template import brain_mask_on_grid

    rng = np.random.default_rng(seed)
    tissue = TissueMaps.from_template(grid)
    spacing_zyx = np.array(list(reversed(grid.spacing)), float)
    shift = rng.uniform(-TEMPLATE_SCAN_SHIFT_MM, TEMPLATE_SCAN_SHIFT_MM, 3) / spacing_zyx
    moved = replace(tissue, wm=ndimage.shift(tissue.wm, shift, order=1), gm=ndimage.shift(tissue.gm, shift, order=1))
    image = render_contrast(moved, modality, noise=TEMPLATE_SCAN_NOISE, seed=seed)
    field = ndimage.gaussian_filter(rng.standard_normal(image.shape), TEMPLATE_SCAN_BIAS_SMOOTH_MM / spacing_zyx)
    field *= TEMPLATE_SCAN_BIAS / max(float(np.abs(field).max()), 1e-12)
    mask = brain_mask_on_grid(grid)
    return np.where(mask, image * np.exp(field), 0.0).astype(np.float32), mask

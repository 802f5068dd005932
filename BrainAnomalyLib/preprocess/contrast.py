"""Which MRI contrast a registered scan is, from how its tissues relate under the template's tissue maps.

After registration the template says where white matter, grey matter and the fluid spaces are. Their robust
intensity levels (WM and GM: histogram peaks; in units of the brain's interquartile range from the brain median)
order differently in each contrast:
  T1, T1CE   WM > GM > CSF
  FLAIR      GM >= WM > CSF (fluid suppressed)
  PD         GM > WM, CSF about as bright as GM (a little above or below)
  T2         CSF > GM >= WM, CSF's lead far larger than the GM-WM gap
Two relations decide: which way the fluid spaces depart from the parenchyma (dark: T1, T1CE, FLAIR; bright: T2,
PD), then the grey-white order. The second is the delicate one: WM is clearly brighter than GM on every T1-weighted
scan, while a FLAIR's GM lead can shrink to nothing (thick 2D slices, oedema in the white matter), so WM has to
lead by T1_MIN_GAP for a T1 call, and a scan within MIN_MARGIN of that boundary is "cannot tell" rather than
either. Tumours and oedema distort the tissue levels of their side of the brain, so the levels come from the
hemisphere whose white matter is the more uniform (narrower intensity spread), in every contrast the healthier one.
T1 and T1CE share the tissue order; gadolinium only adds a bright tail (vessels, choroid plexus, enhancing lesions)
above white matter. On brats18_dev the tail tells them apart, but every T1CE there holds an enhancing tumour; a
healthy T1CE shows little tail, and a T1 with a bright lesion (blood, fat) shows one. So a T1CE call is a note,
never a refusal: the two are compatible (CONTRAST_GROUPS). PD is told from FLAIR and T2 by the CSF level alone and no
real PD scan has checked it, so a PD call never refuses a FLAIR or T2 model either.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
from scipy import ndimage

from ..core.errors import BadInputError
from ..core.manifest import normalise_modality
from ..core.template import Grid, brain_mask_on_grid, tissue_on_grid, ventricles_on_grid

CONTRASTS = ("T1", "T1CE", "T2", "FLAIR", "PD")
# Contrasts that tissue intensities cannot tell apart reliably: a model for one accepts the others, with a note.
CONTRAST_GROUPS = ({"T1", "T1CE"}, {"PD", "FLAIR"}, {"PD", "T2"})
TISSUE_PROBABILITY = {"WM": 0.9, "GM": 0.6}
# Fluid spaces: where the template has almost no parenchyma (ventricles, cisterns, wide sulci).
FLUID_MAX_PARENCHYMA = 0.15
FLUID_QUANTILES = (10, 90)  # the fluid region's reach below and above the parenchyma
MIN_REGION_VOXELS = 50
MODE_BINS = 64
MODE_SMOOTHING_BINS = 2.0
# Decision boundaries (see recognise()), in brain IQRs; the measured distributions on /work/shared/data are in the
# README's "Input checks" section (scripts/contrast_confusion.py).
T1_MIN_GAP = 0.12  # WM - GM above this: the T1 family; below: FLAIR (dark CSF) or PD/T2 (bright CSF)
T1CE_MIN_TAIL = 0.75  # T1 family, brain's top 0.5 % this far above WM (IQRs): T1CE
T2_MIN_CSF_OVER_GAP = 3.0  # T2 family: CSF's lead over parenchyma at least this many GM-WM gaps: T2, else PD
# A call closer than this (brain IQRs) to a boundary with an incompatible contrast cannot be trusted either way:
# the scan is refused unless the modality is given.
MIN_MARGIN = 0.1


@dataclass
class ContrastEstimate:
    contrast: str
    margin: float  # distance, in brain IQRs, of the nearest deciding feature from its boundary
    features: Dict[str, Union[float, str]]  # contrast_features()
    runner_up: str  # the contrast on the other side of the nearest boundary
    # distance to the boundary with each contrast the call was weighed against (T1 vs T1CE left out: compatible)
    margins: Dict[str, float] = field(default_factory=dict)

    @property
    def confident(self) -> bool:
        return self.margin >= MIN_MARGIN

    def to_dict(self) -> dict:
        d = asdict(self)
        d["margin"] = round(self.margin, 4)
        d["margins"] = {k: round(v, 4) for k, v in self.margins.items()}
        return d


def _mode(image: np.ndarray, region: np.ndarray) -> Optional[float]:
    """The commonest intensity (peak of a smoothed histogram): the level of normal tissue, which a lesion or
    oedema covering part of the region shifts far less than it shifts the median."""
    values = image[region]
    if values.size < MIN_REGION_VOXELS:
        return None
    lo, hi = np.percentile(values, [2, 98])
    if hi <= lo:
        return float(lo)
    counts, edges = np.histogram(values, MODE_BINS, (lo, hi))
    k = int(ndimage.gaussian_filter1d(counts.astype(np.float64), MODE_SMOOTHING_BINS).argmax())
    return float((edges[k] + edges[k + 1]) / 2)


def _side_levels(unit: np.ndarray, brain: np.ndarray, regions: Dict[str, np.ndarray]) -> Optional[Dict[str, float]]:
    """Tissue levels of one hemisphere (None when it holds too little of a tissue)."""
    wm_values = unit[brain & regions["WM"]]
    fluid = unit[brain & regions["fluid"]]
    wm, gm = _mode(unit, brain & regions["WM"]), _mode(unit, brain & regions["GM"])
    if wm is None or gm is None or fluid.size < MIN_REGION_VOXELS:
        return None
    low, high = np.percentile(fluid, FLUID_QUANTILES)
    levels = [float(np.median(fluid))]
    ventricles = unit[brain & regions["ventricles"]]
    if ventricles.size >= MIN_REGION_VOXELS:
        levels.append(float(np.median(ventricles)))
    q25, q75 = np.percentile(wm_values, [25, 75])
    return {"wm": wm, "gm": gm,
            # how far the fluid spaces reach below the darker and above the brighter parenchyma
            "fluid_dark": min(wm, gm) - float(low), "fluid_bright": float(high) - max(wm, gm),
            # the bright CSF level (T2 against PD): the brighter of the ventricle core and all fluid spaces, as the
            # other is diluted by tissue where a tumour pushes the ventricles or the sulci are narrow
            "csf": max(levels),
            "wm_spread": float(q75 - q25)}


def contrast_features(image: np.ndarray, mask: np.ndarray, grid: Grid) -> Dict[str, Union[float, str]]:
    """Tissue levels of a registered grid volume in brain IQRs from the brain median, from the hemisphere with the
    more uniform white matter, and the bright tail of the whole brain."""
    brain = mask & brain_mask_on_grid(grid)
    if brain.sum() < MIN_REGION_VOXELS:
        raise BadInputError("the scan's brain does not overlap the template brain; cannot tell its contrast")
    tissue = tissue_on_grid(grid)
    values = image[brain]
    p25, p50, p75, p995 = np.percentile(values, [25, 50, 75, 99.5])
    iqr = float(p75 - p25)
    if iqr <= 0:
        raise BadInputError("the scan's brain has no intensity spread; cannot tell its contrast")
    unit = (image - p50) / iqr
    regions = {"WM": tissue["WM"] >= TISSUE_PROBABILITY["WM"], "GM": tissue["GM"] >= TISSUE_PROBABILITY["GM"],
               "fluid": tissue["WM"] + tissue["GM"] < FLUID_MAX_PARENCHYMA, "ventricles": ventricles_on_grid(grid)}
    # the grid's x axis points right and is split by the midline at its centre (Grid.centre x = 0)
    right = np.zeros(brain.shape, bool)
    right[..., brain.shape[-1] // 2:] = True
    sides = {name: _side_levels(unit, brain & side, regions) for name, side in (("left", ~right), ("right", right))}
    sides = {k: v for k, v in sides.items() if v is not None}
    if not sides:
        raise BadInputError("too little white matter, grey matter or fluid space in the registered scan to tell "
                            "its contrast")
    side = min(sides, key=lambda k: sides[k]["wm_spread"])
    out = {k: round(v, 4) for k, v in sides[side].items()}
    out["side"] = side
    # the bright tail: how far the brain's top half percent reaches above white matter
    out["tail"] = round(float((p995 - p50) / iqr) - out["wm"], 4)
    return out


def recognise(features: Dict[str, Union[float, str]]) -> ContrastEstimate:
    """The contrast the tissue levels say, with the margin (brain IQRs) to each boundary it was weighed against.

    First: do the fluid spaces reach farther below the parenchyma (T1, T1CE, FLAIR) or above it (T2, PD)? CSF
    decides this from far away in every contrast, while the GM-WM gap can vanish (T2 of an older scanner, a
    FLAIR of thick slices). Then the gap: WM ahead of GM by T1_MIN_GAP is the T1 family, anything less with dark
    fluid is FLAIR; among bright-fluid scans, T2's CSF lead dwarfs the GM-WM gap, PD's does not.
    """
    wm, gm = features["wm"], features["gm"]
    gap = wm - gm
    bright = features["fluid_bright"] - features["fluid_dark"]
    if bright > 0:
        lead = features["csf"] - max(wm, gm)
        width = max(abs(gap), 1e-6)
        over = lead / width - T2_MIN_CSF_OVER_GAP
        contrast, other = ("T2", "PD") if over > 0 else ("PD", "T2")
        margins = {"T1" if gap > T1_MIN_GAP else "FLAIR": bright, other: abs(over) * width}
    elif gap > T1_MIN_GAP:
        # T1 against T1CE does not count in the margins: they are compatible
        contrast = "T1CE" if features["tail"] > T1CE_MIN_TAIL else "T1"
        margins = {"FLAIR": gap - T1_MIN_GAP, "T2": -bright}
    else:
        contrast = "FLAIR"
        margins = {"T1": T1_MIN_GAP - gap, "PD" if gap < 0 else "T2": -bright}
    nearest = min(margins, key=margins.get)
    return ContrastEstimate(contrast, float(margins[nearest]), dict(features), nearest, margins)


def estimate_contrast(image: np.ndarray, mask: np.ndarray, grid: Grid) -> ContrastEstimate:
    return recognise(contrast_features(image, mask, grid))


def compatible(a: str, b: str) -> bool:
    return a == b or any(a in g and b in g for g in CONTRAST_GROUPS)


def check_contrast(estimate: Optional[dict], expected: str, declared: Optional[str] = None,
                   models: Optional[Callable[[], Sequence[dict]]] = None, model_name: str = "the model") -> List[str]:
    """Refuse a scan whose recognised contrast does not fit the model's (BadInputError); return notes.

    A call within MIN_MARGIN of a contrast the model does not take is refused too ("cannot tell"): an unclear scan
    must never slip into a model of another contrast. `estimate` is ContrastEstimate.to_dict() from the
    preprocessing record; `declared` is the contrast the user gave explicitly (it overrides the recognition, and
    the override is noted); `models` lists the available models (store.models.list_models) to name the ones that
    fit.
    """
    if estimate is None:
        return []
    detected, margin = estimate["contrast"], float(estimate["margin"])
    expected = normalise_modality(expected)
    reference = normalise_modality(declared) if declared is not None else expected
    # records written before the margins were kept hold only the nearest boundary
    margins = estimate.get("margins") or {estimate["runner_up"]: margin}
    # boundaries across which the verdict (fits the model or not) would flip
    flips = {c: float(m) for c, m in margins.items() if compatible(c, reference) != compatible(detected, reference)}
    close = min(flips, key=flips.get) if flips else None
    unclear = close is not None and flips[close] < MIN_MARGIN
    if unclear:
        said = (f"cannot tell the scan's contrast: it looks most like {detected} but is within {flips[close]:.2f} "
                f"IQR of {close} (tissue contrast)")
    else:
        said = f"the scan looks like {detected} (tissue contrast margin {margin:.2f} IQR)"
    fits_reference = compatible(detected, reference) and not unclear
    if declared is not None:
        return [] if fits_reference else [f"contrast check overridden: {said}, but the modality was given as "
                                          f"{reference}"]
    if fits_reference:
        if detected != expected:
            return [(f"{said}; {detected} and {expected} cannot be told apart reliably from tissue intensities, so "
                     f"the {expected} model was used")]
        return []
    candidates = [c for c in (detected, close if unclear else None) if c and not compatible(c, expected)]
    # a model of several contrasts (a fusion) is no alternative for one scan
    fits = [m["id"] for m in (models() if models else []) if len(m.get("inputs") or []) <= 1
            and any(compatible(c, str(m.get("modality") or "")) for c in candidates)]
    others = f"a {' or '.join(candidates)} model ({', '.join(fits) if fits else 'none installed'})"
    if unclear:
        raise BadInputError(f"{said}; {model_name} is for {expected} scans: give --modality {expected} if it is one, "
                            f"or use {others}")
    raise BadInputError(f"{said}, but {model_name} is for {expected} scans; use {others} or give --modality "
                        f"{expected} to go on anyway")

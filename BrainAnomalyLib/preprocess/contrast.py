"""Which MRI contrast a registered scan is, from how its tissues relate under the template's tissue maps.

After registration the template says where white matter, grey matter and the ventricles are. Their robust
intensity levels (WM and GM: histogram peaks; ventricle core: median; in units of the brain's interquartile range
from the brain median) order differently in each contrast:
  T1, T1CE   WM > GM > CSF
  FLAIR      GM > WM > CSF (fluid suppressed)
  PD         GM > WM, CSF about as bright as GM (a little above or below)
  T2         CSF > GM >= WM, CSF's lead far larger than the GM-WM gap
T1 and T1CE share that order; gadolinium only adds a bright tail (vessels, choroid plexus, enhancing lesions) above
white matter. On brats18_dev the tail tells them apart, but every T1CE there holds an enhancing tumour; a healthy
T1CE shows little tail, and a T1 with a bright lesion (blood, fat) shows one. So a T1CE call is a note, never a
refusal: the two are compatible (CONTRAST_GROUPS). PD is told from FLAIR and T2 by the CSF level alone and no real PD
scan has checked it, so a PD call never refuses a FLAIR or T2 model either.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
from scipy import ndimage

from ..core.errors import BadInputError
from ..core.manifest import normalise_modality
from ..core.template import Grid, brain_mask_on_grid, tissue_on_grid, ventricles_on_grid

CONTRASTS = ("T1", "T1CE", "T2", "FLAIR", "PD")
# Contrasts that tissue intensities cannot tell apart reliably: a model for one accepts the others, with a note.
CONTRAST_GROUPS = ({"T1", "T1CE"}, {"PD", "FLAIR"}, {"PD", "T2"})
TISSUE_PROBABILITY = {"WM": 0.9, "GM": 0.6}
MIN_REGION_VOXELS = 50
MODE_BINS = 64
MODE_SMOOTHING_BINS = 2.0
# Decision boundaries (see recognise()); set from the scans of /work/shared/data, see scripts/contrast_confusion.py
# and the README's "Input checks" section for the measured distributions.
CSF_BRIGHTEST = 0.0  # CSF - max(WM, GM), in brain IQRs, above this: the T2 family (T2, PD)
T1CE_MIN_TAIL = 1.5  # T1 family, brain's top 0.5 % this far above WM (IQRs): T1CE
T2_MIN_CSF_OVER_GAP = 3.0  # T2 family: CSF's lead over parenchyma at least this many GM-WM gaps: T2, else PD
# Below this margin (brain IQRs from the nearest boundary) the call is too close to refuse a scan on.
MIN_MARGIN = 0.15


@dataclass
class ContrastEstimate:
    contrast: str
    margin: float  # distance, in brain IQRs, of the deciding feature from its boundary
    features: Dict[str, float]
    runner_up: str  # the contrast on the other side of the nearest boundary

    @property
    def confident(self) -> bool:
        return self.margin >= MIN_MARGIN

    def to_dict(self) -> dict:
        d = asdict(self)
        d["margin"] = round(self.margin, 4)
        return d


def _median(image: np.ndarray, region: np.ndarray) -> Optional[float]:
    values = image[region]
    return float(np.median(values)) if values.size >= MIN_REGION_VOXELS else None


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


def contrast_features(image: np.ndarray, mask: np.ndarray, grid: Grid) -> Dict[str, float]:
    """WM and GM levels (histogram modes), the ventricles' median and the bright tail of a registered grid volume,
    in brain IQRs from the brain median."""
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
    wm = _mode(unit, brain & (tissue["WM"] >= TISSUE_PROBABILITY["WM"]))
    gm = _mode(unit, brain & (tissue["GM"] >= TISSUE_PROBABILITY["GM"]))
    # The ventricle core is part CSF, part tissue (ventricles differ in size, tumours push them): its median
    # leans to the CSF side, where its mode can land on the tissue.
    csf = _median(unit, brain & ventricles_on_grid(grid))
    if wm is None or gm is None or csf is None:
        raise BadInputError("too little white matter, grey matter or ventricle in the registered scan to tell "
                            "its contrast")
    return {"wm": round(wm, 4), "gm": round(gm, 4), "csf": round(csf, 4),
            # the bright tail: how far the brain's top half percent reaches above white matter
            "tail": round(float((p995 - p50) / iqr) - wm, 4)}


def recognise(features: Dict[str, float]) -> ContrastEstimate:
    """The contrast the tissue levels say, with the margin (brain IQRs) to the nearest decision boundary.

    First: is CSF the brightest tissue (T2, PD) or not (T1, T1CE, FLAIR)? CSF decides this from far away in every
    contrast, while the GM-WM gap can vanish (T2 of an older scanner, a brain full of tumour). Then the gap: WM
    brighter than GM is the T1 family, GM brighter is FLAIR when CSF stays below WM (PD otherwise); among bright-CSF
    scans, T2's CSF lead dwarfs the GM-WM gap, PD's does not.
    """
    wm, gm, csf = features["wm"], features["gm"], features["csf"]
    parenchyma = max(wm, gm)
    lead = csf - parenchyma - CSF_BRIGHTEST
    gap = wm - gm
    if lead > 0:
        width = max(abs(gap), 1e-6)
        over = (csf - parenchyma) / width - T2_MIN_CSF_OVER_GAP
        contrast, other = ("T2", "PD") if over > 0 else ("PD", "T2")
        margins = {"T1" if gap > 0 else "FLAIR": lead, other: abs(over) * width}
    elif gap > 0:
        # T1 against T1CE does not count in the margin: they are compatible
        contrast = "T1CE" if features["tail"] > T1CE_MIN_TAIL else "T1"
        margins = {"T2": -lead, "FLAIR": gap}
    else:
        suppressed = wm - csf
        contrast = "FLAIR" if suppressed > 0 else "PD"
        margins = {"T2": -lead, "T1": -gap, "PD" if contrast == "FLAIR" else "FLAIR": abs(suppressed)}
    nearest = min(margins, key=margins.get)
    return ContrastEstimate(contrast, float(margins[nearest]), dict(features), nearest)


def estimate_contrast(image: np.ndarray, mask: np.ndarray, grid: Grid) -> ContrastEstimate:
    return recognise(contrast_features(image, mask, grid))


def compatible(a: str, b: str) -> bool:
    return a == b or any(a in g and b in g for g in CONTRAST_GROUPS)


def check_contrast(estimate: Optional[dict], expected: str, declared: Optional[str] = None,
                   models: Optional[Callable[[], Sequence[dict]]] = None, model_name: str = "the model") -> List[str]:
    """Refuse a scan whose recognised contrast does not fit the model's (BadInputError); return notes.

    `estimate` is ContrastEstimate.to_dict() from the preprocessing record; `declared` is the contrast the user
    gave explicitly (it overrides the recognition, and the override is noted); `models` lists the available
    models (store.models.list_models) to name the ones that fit.
    """
    if estimate is None:
        return []
    detected, margin = estimate["contrast"], float(estimate["margin"])
    expected = normalise_modality(expected)
    said = f"the scan looks like {detected} (tissue contrast margin {margin:.2f} IQR)"
    if declared is not None:
        declared = normalise_modality(declared)
        if compatible(detected, declared):
            return []
        return [f"contrast check overridden: {said}, but the modality was given as {declared}"]
    if compatible(detected, expected):
        if detected != expected:
            return [(f"{said}; {detected} and {expected} cannot be told apart reliably from tissue intensities, so "
                     f"the {expected} model was used")]
        return []
    if margin < MIN_MARGIN:
        return [f"contrast unclear: {said}, close to {estimate['runner_up']}; went on as {expected}"]
    fits = [m["id"] for m in (models() if models else []) if compatible(detected, str(m.get("modality") or ""))]
    raise BadInputError(f"{said}, but {model_name} is for {expected} scans; use a {detected} model "
                        f"({', '.join(fits) if fits else 'none installed'}) or give --modality {expected} to go "
                        "on anyway")

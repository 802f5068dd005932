"""Which MRI contrast a registered scan is, from how its tissues relate under the template's tissue maps.

After registration the template says where white matter, grey matter and the ventricles are. Their robust
intensity medians (in units of the brain's interquartile range) order differently in each contrast:
  T1, T1CE   WM > GM > CSF
  FLAIR      GM > WM > CSF (fluid suppressed)
  PD         GM > WM, CSF about as bright as GM (a little above or below)
  T2         CSF > GM >= WM, CSF's lead far larger than the GM-WM gap
T1 and T1CE share that order; gadolinium only adds a bright tail (vessels, choroid plexus, enhancing lesions) above
white matter, which a skull-stripped healthy T1CE barely shows, so the two are treated as compatible (see
CONTRAST_GROUPS) and the tail is recorded, not used to refuse.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from ..core.errors import BadInputError
from ..core.manifest import normalise_modality
from ..core.template import Grid, brain_mask_on_grid, tissue_on_grid, ventricles_on_grid

CONTRASTS = ("T1", "T1CE", "T2", "FLAIR", "PD")
# Contrasts that tissue intensities cannot tell apart: a model for one accepts the others, with a note.
CONTRAST_GROUPS = ({"T1", "T1CE"},)
TISSUE_PROBABILITY = {"WM": 0.9, "GM": 0.6}
MIN_REGION_VOXELS = 50
# Decision boundaries (see recognise()); set from the scans of /work/shared/data, see scripts/contrast_confusion.py
# and the README's "Input checks" section for the measured distributions.
CSF_BRIGHTEST = 0.0  # CSF - max(WM, GM), in brain IQRs, above this: the T2 family (T2, PD)
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


def contrast_features(image: np.ndarray, mask: np.ndarray, grid: Grid) -> Dict[str, float]:
    """Tissue medians and the bright tail of a registered grid volume, in brain IQRs from the brain median."""
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
    wm = _median(unit, brain & (tissue["WM"] >= TISSUE_PROBABILITY["WM"]))
    gm = _median(unit, brain & (tissue["GM"] >= TISSUE_PROBABILITY["GM"]))
    csf = _median(unit, brain & ventricles_on_grid(grid))
    if wm is None or gm is None or csf is None:
        raise BadInputError("too little white matter, grey matter or ventricle in the registered scan to tell "
                            "its contrast")
    return {"wm": round(wm, 4), "gm": round(gm, 4), "csf": round(csf, 4),
            # the bright tail: how far the brain's top half percent reaches above white matter
            "tail": round(float((p995 - p50) / iqr) - wm, 4)}


def recognise(features: Dict[str, float]) -> ContrastEstimate:
    """The contrast the tissue medians say, with the margin (brain IQRs) to the nearest decision boundary.

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
        contrast, margins = "T1", {"T2": -lead, "FLAIR": gap}
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
            return [f"{said}; {detected} and {expected} cannot be told apart from tissue intensities, so the "
                    f"{expected} model was used"]
        return []
    if margin < MIN_MARGIN:
        return [f"contrast unclear: {said}, close to {estimate['runner_up']}; went on as {expected}"]
    fits = [m["id"] for m in (models() if models else []) if compatible(detected, str(m.get("modality") or ""))]
    raise BadInputError(f"{said}, but {model_name} is for {expected} scans; use a {detected} model "
                        f"({', '.join(fits) if fits else 'none installed'}) or give --modality {expected} to go "
                        "on anyway")

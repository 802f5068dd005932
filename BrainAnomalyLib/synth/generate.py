"""One synthetic case: a healthy scan plus one seeded lesion or artefact, with its mask and a full record."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import List, Optional

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..core.manifest import normalise_modality
from . import artefacts, lesions
from .kinds import ARTEFACT_KINDS, KINDS
from .appearance import rule_modality, tissue_stats
from .tissue import TissueMaps, lps_to_ras


@dataclass
class SynthCase:
    image: sitk.Image  # float32, the input's geometry
    mask: sitk.Image  # uint8 labels (tumour: 1 necrosis, 2 oedema, 4 enhancing; others 1); all 0 for artefacts
    kind: str
    records: List[dict] = field(default_factory=list)
    # Tumour only: (z,y,x,3) float32, LPS mm, ITK convention out(p) = in(p + u(p)); see displacement_image().
    displacement: Optional[np.ndarray] = None

    @property
    def is_artefact(self) -> bool:
        return self.kind in ARTEFACT_KINDS


def displacement_image(case: SynthCase) -> Optional[sitk.Image]:
    """The tumour's displacement as a vector image on the case's grid, ready for sitk.DisplacementFieldTransform
    (which needs float64) or for writing to disk."""
    if case.displacement is None:
        return None
    image = sitk.GetImageFromArray(case.displacement.astype(np.float64), isVector=True)
    image.CopyInformation(case.image)
    return image


def _rng(seed: int, kind: str) -> np.random.Generator:
    # The kind is part of the seed so one seed gives unrelated draws for different kinds; crc32 is stable
    # across runs and platforms, unlike hash().
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, zlib.crc32(kind.encode())]))


def _as_float_array(image: sitk.Image) -> np.ndarray:
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("synthesize needs a scalar 3D image")
    return sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))


def _summary(mask: np.ndarray, tissue: TissueMaps) -> dict:
    """Where the lesion ended up and how big it is, measured on the final mask."""
    geo = tissue.geometry
    out: dict = {"volume_ml": round(float((mask > 0).sum()) * geo.voxel_ml, 4)}
    if (mask > 0).any():
        centroid = np.array(ndimage.center_of_mass(mask > 0))
        out["centre_ras"] = lps_to_ras(geo.points(centroid[None])[0])
        labels = [int(v) for v in np.unique(mask) if v]
        if len(labels) > 1:
            out["volume_ml_by_label"] = {str(v): round(float((mask == v).sum()) * geo.voxel_ml, 4) for v in labels}
        out["white_matter_fraction"] = round(float((tissue.wm[mask > 0] > 0.5).mean()), 4)
    return out


def synthesize(image: sitk.Image, modality: str, kind: str, seed: int, tissue: TissueMaps) -> SynthCase:
    """Insert one seeded anomaly of `kind` into a healthy `image` of `modality`.

    Lesion kinds change only voxels inside the brain and inside the returned mask (tumour: after its recorded
    mass effect); artefact kinds change the whole image and return an empty mask. Same inputs and seed give
    bit-identical outputs.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic kind {kind!r}; choose from {', '.join(KINDS)}")
    tissue.check_matches(image)
    array = _as_float_array(image)
    rng = _rng(seed, kind)
    modality = normalise_modality(modality)
    record: dict = {"kind": kind, "seed": int(seed), "modality": modality}
    displacement = None
    if kind in ARTEFACT_KINDS:
        out, params = artefacts.GENERATORS[kind](array, tissue.geometry, rng)
        mask = np.zeros(array.shape, np.uint8)
        record.update({"artefact": True, "parameters": params, "volume_ml": 0.0})
    else:
        stats = tissue_stats(array, tissue)
        if kind.startswith("blob-"):
            edit = lesions.blob(array, tissue, stats, kind, rng)
        else:
            edit = {"tumour": lesions.tumour, "ms": lesions.ms, "stroke": lesions.stroke}[kind](
                array, tissue, stats, modality, rng)
        out, mask, displacement = edit.array, edit.mask, edit.displacement
        record.update({"artefact": False, "appearance_rules": rule_modality(modality),
                       "tissue_stats": stats.to_dict(), **edit.record, **_summary(mask, tissue)})
        if displacement is not None:
            record["displacement_max_mm"] = record["mass_effect"]["displacement_max_mm"]
    result = sitk.GetImageFromArray(out.astype(np.float32, copy=False))
    result.CopyInformation(image)
    mask_image = sitk.GetImageFromArray(mask.astype(np.uint8, copy=False))
    mask_image.CopyInformation(image)
    return SynthCase(result, mask_image, kind, [record], displacement)

"""Skull stripping with deepbet (weights ship inside the package), or detection of scans already stripped."""

from __future__ import annotations

from functools import lru_cache
from typing import Optional

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..core.background import settle
from ..core.errors import BadInputError
from ..core.progress import Reporter

MIN_BRAIN_ML = 300.0
# A stripped scan is mostly one constant background value, and what remains has the volume of a brain.
STRIPPED_BACKGROUND_FRACTION = 0.3
STRIPPED_MAX_ML = 2500.0


# Voxels within this share of the intensity range of the background value count as background (ringing of
# resampled files, rounding of rescaled ones).
BACKGROUND_TOLERANCE = 1e-3


def background_value(arr: np.ndarray) -> float:
    """The value the volume's border voxels hold most often: a stripped scan's background constant, whatever it
    is (0, a small negative number, -1024), or the commonest air value of a head scan."""
    faces = np.concatenate([arr[[0, -1]].ravel(), arr[:, [0, -1]].ravel(), arr[:, :, [0, -1]].ravel()])
    values, counts = np.unique(faces, return_counts=True)
    return float(values[counts.argmax()])


def _background(arr: np.ndarray) -> np.ndarray:
    bg = background_value(arr)
    span = float(max(arr.max() - bg, bg - arr.min()))
    return np.abs(arr - bg) <= BACKGROUND_TOLERANCE * span


def foreground_mask(image: sitk.Image, background: Optional[np.ndarray] = None) -> np.ndarray:
    """Non-background voxels (z,y,x bool): those away from the background value, holes filled, largest
    component. `background` is _background's answer for the image when the caller has it already."""
    mask = ~(_background(sitk.GetArrayViewFromImage(image)) if background is None else background)
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        mask = labels == sizes.argmax()
    return fill_holes(mask)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """ndimage.binary_fill_holes(mask), in one labelling pass: the outside is the non-mask voxels face-connected
    to the volume's border, and everything else is kept. binary_fill_holes grows the outside in from the border one
    voxel per iteration, which on a 1 mm volume took seconds."""
    labels, n = ndimage.label(~mask)
    outside = np.zeros(n + 1, bool)
    outside[np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel(), labels[:, :, [0, -1]].ravel()])] = True
    outside[0] = False  # label 0: the mask itself
    return ~outside[labels]


def voxel_ml(image: sitk.Image) -> float:
    return float(np.prod(image.GetSpacing())) / 1000.0


def looks_skull_stripped(image: sitk.Image, background: Optional[np.ndarray] = None) -> bool:
    if background is None:
        background = _background(sitk.GetArrayViewFromImage(image))
    volume = float(background.size - np.count_nonzero(background)) * voxel_ml(image)
    return float(background.mean()) >= STRIPPED_BACKGROUND_FRACTION and volume <= STRIPPED_MAX_ML


@lru_cache(maxsize=2)
def _deepbet(use_gpu: bool):
    from deepbet import BrainExtraction

    return BrainExtraction(no_gpu=not use_gpu)


def deepbet_mask(image: sitk.Image, use_gpu: bool, reporter: Reporter) -> np.ndarray:
    """deepbet brain mask for `image` (z,y,x bool on the image's own grid)."""
    settle(reporter)  # deepbet imports torch, which the networks' loading thread may be importing
    import torch

    ras = sitk.DICOMOrient(image, "RAS")
    x = np.ascontiguousarray(sitk.GetArrayFromImage(ras).transpose(2, 1, 0), dtype=np.float32)
    reporter("skull-strip", 0.1)
    bet = _deepbet(use_gpu)
    with torch.no_grad():
        prob = bet.run_model(x)
    reporter("skull-strip", 0.8)
    mask = bet.postprocess(prob > 0.5, 0).astype(np.uint8)
    mask_ras = sitk.GetImageFromArray(mask.transpose(2, 1, 0))
    mask_ras.CopyInformation(ras)
    back = sitk.Resample(mask_ras, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(back).astype(bool)


def brain_mask(image: sitk.Image, mode: str, use_gpu: bool, reporter: Reporter) -> tuple[np.ndarray, dict]:
    """Brain mask by `mode`: 'auto' (strip unless already stripped), 'deepbet', or 'none' (scan is a brain)."""
    if mode not in ("auto", "deepbet", "none"):
        raise ValueError(f"unknown skull-strip mode {mode!r}")
    background = _background(sitk.GetArrayViewFromImage(image))
    already = looks_skull_stripped(image, background)
    if mode == "none" or (mode == "auto" and already):
        mask, how = foreground_mask(image, background), "already stripped: foreground of the scan"
    else:
        mask, how = deepbet_mask(image, use_gpu, reporter), "deepbet"
    volume = float(mask.sum()) * voxel_ml(image)
    if volume < MIN_BRAIN_ML:
        raise BadInputError(f"the brain mask after skull-stripping is empty or too small ({volume:.0f} mL); "
                            "is this a brain MRI?")
    return mask, {"method": how, "looked_stripped": already, "brain_ml": round(volume, 1)}

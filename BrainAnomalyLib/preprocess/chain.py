"""The preprocessing chain: orient -> skull-strip -> N4 -> register -> resample -> normalise, and the way back."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from ..core.box import mask_box
from ..core.errors import BadInputError
from ..core.progress import Reporter
from ..core.template import Grid, brain_mask_on_grid, template_on_grid, tissue_on_grid
from .bias import BiasField, fit_n4
from .contrast import estimate_contrast
from .normalise import TORCH_METHODS, normalise
from .register import affine_to_dict, register_affine
from .sanity import assess_scan, check_structure
from .skullstrip import brain_mask, foreground_mask
from .working_scale import working_copy


# The version of what this chain computes from a scan for given settings; preprocessing caches are keyed on it, so
# raise it with every change that moves the output (2: N4 and registration on the grid-resolution working copy, the
# field applied on the grid; 3, 4: the registration single-threaded, through ITK's global default; 5: N4's
# iteration caps back at (50, 50, 30) after version 4's halved ones; 6: the affine registration back on the input's
# own voxels; 7: the registration's start search and coarse levels on the working copy, its last level a run of
# its own on the input's voxels; 8: that last level stopping at a 10 times larger step; 9: that last level given
# the brain's bounding box instead of the whole input, which moved transform parameters by up to 1e-7; 10: N4's
# levels ending at its convergence threshold 1e-3, the registration's coarse levels at a 10 times larger step; 11:
# the bounding box's margin 10 mm instead of 20, which moved the grid's corners by at most 6e-7 mm on four scans).
CHAIN_VERSION = 11


@dataclass
class PreprocessConfig:
    skull_strip: str = "auto"  # auto | deepbet | none
    bias_correction: bool = True
    registration: str = "affine"  # affine (SimpleITK) | torch (preprocess.torch_register) | none (in template space)
    normalisation: str = "median-iqr"
    # The histogram method's standard scale, learned from the training cohort (stored with the model).
    normalisation_reference: Optional[List[float]] = None

    def to_dict(self) -> dict:
        return asdict(self)

    def geometry_dict(self) -> dict:
        """The settings that decide the grid volume before standardisation (what the cache is keyed on)."""
        return {k: v for k, v in asdict(self).items() if not k.startswith("normalisation")}

    @classmethod
    def from_dict(cls, d: dict) -> "PreprocessConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class Preprocessed:
    image: np.ndarray  # standardised scan on the model grid (z,y,x)
    mask: np.ndarray  # brain mask on the model grid
    native_mask: np.ndarray  # brain mask on the input's own grid
    transform: sitk.Transform  # maps template points to input points
    grid: Grid
    record: List[dict] = field(default_factory=list)
    raw_image: Optional[np.ndarray] = None  # the grid volume before standardisation
    contrast: Optional[dict] = None  # the recognised contrast (preprocess.contrast.ContrastEstimate.to_dict())
    notes: List[str] = field(default_factory=list)  # borderline findings the user should see
    # How far one input voxel reaches along each grid axis (z, y, x; mm): thick slices blur tissue boundaries
    # further than the grid's own sampling does (scorers/tissue.py widens its priors by the excess). None where
    # unknown, taken as the grid's own spacing.
    acquisition_mm: Optional[List[float]] = None


def standardise(raw: np.ndarray, mask: np.ndarray, config: PreprocessConfig, grid: Grid,
                torch_device: Optional[str] = None) -> tuple[np.ndarray, dict]:
    """Apply the configured intensity standardisation to a grid volume (see preprocess.normalise); on
    `torch_device` (the CUDA path) where torch_grid has the method."""
    tissue = tissue_on_grid(grid) if config.normalisation == "tissue-peaks" else None
    try:
        if torch_device is not None and config.normalisation in TORCH_METHODS:
            from . import torch_grid  # torch only on the CUDA path

            return torch_grid.normalise_array(raw, mask, config.normalisation, tissue, torch_device)
        return normalise(raw, mask, config.normalisation, config.normalisation_reference, tissue)
    except ValueError as exc:
        raise BadInputError(f"intensity standardisation failed: {exc}") from None


class _Recorder:
    def __init__(self) -> None:
        self.steps: List[dict] = []

    def add(self, name: str, applied: bool, started: float, **details) -> None:
        self.steps.append({"step": name, "applied": applied, "seconds": round(time.perf_counter() - started, 3),
                           **details})


def preprocess(native: sitk.Image, config: PreprocessConfig, grid: Grid, use_gpu: bool,
               reporter: Reporter, torch_device: Optional[str] = None) -> Preprocessed:
    """The chain on a scan; with `torch_device` (the CUDA path) the resampling onto the grid and the
    standardisation run in torch there (preprocess.torch_grid), everything else as on the CPU."""
    rec = _Recorder()
    t = time.perf_counter()
    # Orientation changes only the voxel order, never physical positions, so mapping back is exact.
    code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(native.GetDirection())
    work = sitk.DICOMOrient(native, "RAS")
    # before the skull-strip and registration spend seconds on a volume of noise
    structure = check_structure(sitk.GetArrayViewFromImage(work))
    rec.add("orient", code != "RAS", t, from_orientation=code, to_orientation="RAS", neighbour_correlation=structure)

    t = time.perf_counter()
    mask, info = brain_mask(work, config.skull_strip, use_gpu, reporter.sub(0.0, 0.3))
    rec.add("skull-strip", info["method"] == "deepbet", t, mode=config.skull_strip, **info)
    brain_ml = info["brain_ml"]
    stripped = _apply_mask(work, mask)
    small, small_mask = working_copy(stripped, mask, min(grid.spacing))
    field = _bias_field(small, small_mask, config, rec, reporter.sub(0.3, 0.5))

    t = time.perf_counter()
    fixed = template_on_grid(grid)
    if config.registration == "affine":
        # The input's own voxels, not the working copy: aligned on the working copy, the brats18_dev T1 AUPRC of
        # the shipped models fell by up to 0.010 (dpa-t1-ixi 0.505 -> 0.496), with N4 alone on it by at most 0.002.
        boxed, boxed_mask = brain_box(stripped, mask)
        moving = field.apply(boxed) if field is not None else boxed
        coarse = (field.apply(small) if field is not None else small, small_mask)
        transform, info = register_affine(moving, boxed_mask, fixed, brain_mask_on_grid(grid),
                                          reporter.sub(0.5, 0.95), coarse=coarse)
        rec.add("register", True, t, method="affine, Mattes MI", transform=affine_to_dict(transform), **info)
    elif config.registration == "torch":
        from .torch_register import as_sitk_affine, register_affine_torch

        moving = field.apply(small) if field is not None else small
        matrix, info = register_affine_torch(moving, small_mask, fixed, brain_mask_on_grid(grid),
                                             torch_device or "cpu")
        transform = as_sitk_affine(matrix)
        rec.add("register", True, t, method="affine, torch NCC", transform=affine_to_dict(transform), **info)
    elif config.registration == "none":
        transform = sitk.AffineTransform(3)
        rec.add("register", False, t, transform=affine_to_dict(transform))
    else:
        raise ValueError(f"unknown registration {config.registration!r}")

    t = time.perf_counter()
    ref = grid.reference()
    mask_img = _mask_image(mask, work)
    if torch_device is not None:
        from . import torch_grid

        raw, grid_mask = torch_grid.onto_grid(stripped, mask, transform, ref, torch_device)
        raw = _bias_corrected_on_grid(raw, field, ref, transform)
    else:
        raw = _on_grid(stripped, field, ref, transform)
        grid_mask = sitk.GetArrayFromImage(
            sitk.Resample(mask_img, ref, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)).astype(bool)
    rec.add("resample", True, t, grid=grid.to_dict(), device=torch_device or "cpu")
    reporter("resample", 0.97)

    t = time.perf_counter()
    measures, notes = assess_scan(raw, grid_mask, grid, brain_ml, transform.GetMatrix())
    rec.add("sanity", True, t, **measures, notes=notes)
    t = time.perf_counter()
    contrast = estimate_contrast(raw, grid_mask, grid).to_dict()
    rec.add("contrast", True, t, **contrast)

    t = time.perf_counter()
    image, info = standardise(raw, grid_mask, config, grid, torch_device)
    rec.add("normalise", True, t, **info)
    reporter("normalise", 1.0)

    native_mask = sitk.GetArrayFromImage(
        sitk.Resample(mask_img, native, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)).astype(bool)
    return Preprocessed(image, grid_mask, native_mask, transform, grid, rec.steps, raw_image=raw, contrast=contrast,
                        notes=notes, acquisition_mm=voxel_extent_on_grid(work, transform, grid))


def voxel_extent_on_grid(native: sitk.Image, transform: sitk.AffineTransform, grid: Grid) -> List[float]:
    """The extent of one input voxel along each grid axis (z, y, x; mm): the voxel's edges, carried into template
    space through the inverse of the registration's linear part and projected onto the grid's axes."""
    edges = np.array(native.GetDirection()).reshape(3, 3) * np.array(native.GetSpacing())  # columns: i, j, k edges
    in_template = np.linalg.solve(np.array(transform.GetMatrix()).reshape(3, 3), edges)
    axes = np.array(grid.reference().GetDirection()).reshape(3, 3)  # columns: the grid's x, y, z axes
    extent = np.abs(axes.T @ in_template).sum(axis=1)  # x, y, z
    return [round(float(v), 4) for v in extent[::-1]]


def to_native(array: np.ndarray, pre: Preprocessed, native: sitk.Image, nearest: bool = False,
              torch_device: Optional[str] = None) -> sitk.Image:
    """Resample a model-grid array onto the input's own grid through the inverse of the registration (in torch
    on `torch_device`, the CUDA path)."""
    if torch_device is not None:
        from . import torch_grid

        return torch_grid.back_to_native(array, pre.grid.reference(), pre.transform, native, nearest, torch_device)
    src = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    src.CopyInformation(pre.grid.reference())
    inverse = pre.transform.GetInverse()
    interp = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    return sitk.Resample(src, native, inverse, interp, 0.0, sitk.sitkFloat32)


def _bias_field(image: sitk.Image, mask: np.ndarray, config: PreprocessConfig, rec: _Recorder,
                reporter: Reporter) -> Optional[BiasField]:
    """The N4 field of the working copy when the configuration asks for it (None otherwise), recorded either way."""
    t = time.perf_counter()
    if not config.bias_correction:
        rec.add("bias-correct", False, t)
        return None
    field, info = fit_n4(image, mask, reporter)
    rec.add("bias-correct", True, t, method="N4", **info)
    return field


def _on_grid(stripped: sitk.Image, field: Optional[BiasField], ref: sitk.Image, transform: sitk.Transform
             ) -> np.ndarray:
    """The scan on the model grid, bias-corrected: one interpolation of the input's own voxels, with the smooth
    field (fitted on the working copy) sampled at the same grid points, instead of a corrected full-resolution copy
    that is then resampled."""
    raw = sitk.GetArrayFromImage(sitk.Resample(stripped, ref, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    return _bias_corrected_on_grid(raw, field, ref, transform)


def _bias_corrected_on_grid(raw: np.ndarray, field: Optional[BiasField], ref: sitk.Image,
                            transform: sitk.Transform) -> np.ndarray:
    """`raw` (the scan on the grid of `ref`) corrected by the field sampled at the same grid points."""
    if field is None:
        return raw
    log_field = sitk.GetArrayFromImage(sitk.Resample(field.log_field, ref, transform, sitk.sitkLinear, 0.0,
                                                     sitk.sitkFloat32))
    return field.corrected(raw, log_field)


def _mask_image(mask: np.ndarray, reference: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.CopyInformation(reference)
    return img


# Background kept around the brain's bounding box for the registration's last level: the template brain's samples
# land in it once the scan is roughly aligned (the coarse levels have done that), where they read the background
# they would read in the whole volume. At 10 mm instead of 20 the last level took 0.05-0.33 s less on three BraTS
# scans and an IXI T1 (its gradient image is of fewer voxels) and moved the grid's corners by at most 6e-7 mm.
BOX_MARGIN_MM = 10.0


def brain_box(image: sitk.Image, mask: np.ndarray, margin_mm: float = BOX_MARGIN_MM
              ) -> tuple[sitk.Image, np.ndarray]:
    """(image, mask) cut to the brain's bounding box widened by `margin_mm`, physical positions unchanged: the
    registration's last level builds a gradient image of all the voxels it is given, and on a 1 mm BraTS scan a
    third of them lie far outside the brain."""
    if not mask.any():
        return image, mask
    box = mask_box(mask, [int(np.ceil(margin_mm / s)) for s in reversed(image.GetSpacing())])  # z, y, x
    if all(b.start == 0 and b.stop == n for b, n in zip(box, mask.shape)):
        return image, mask
    cut = sitk.RegionOfInterest(image, [b.stop - b.start for b in box][::-1], [b.start for b in box][::-1])
    return cut, mask[box]


def _apply_mask(image: sitk.Image, mask: np.ndarray) -> sitk.Image:
    arr = sitk.GetArrayFromImage(image)
    out = sitk.GetImageFromArray(np.where(mask, arr, 0).astype(np.float32))
    out.CopyInformation(image)
    return out


# A companion scan must hold nearly all of the reference brain: a few voxels may fall outside a tighter field of view.
MIN_SHARED_BRAIN = 0.95


def companion_coverage(native: sitk.Image, reference: Preprocessed, reference_native: sitk.Image
                       ) -> Tuple[np.ndarray, float, float]:
    """The reference scan's brain mask on the companion's grid, and the shares of the reference brain that lie
    inside the companion's field of view and that have signal there (not its background). BadInputError when
    either is under MIN_SHARED_BRAIN: another session, or a companion that covers only part of the brain (a FLAIR
    of a limited field of view: Brats18_2013_20_1's has signal in 66 % of its T1's brain, every other brats18_dev
    contrast in 99.8-100 %), whose empty part the fused map would read as tissue."""
    ref_mask = _mask_image(reference.native_mask, reference_native)
    mask = sitk.GetArrayFromImage(sitk.Resample(ref_mask, native, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                sitk.sitkUInt8)).astype(bool)
    reference_ml = max(reference.native_mask.sum() * float(np.prod(reference_native.GetSpacing())), 1e-9)
    voxel = float(np.prod(native.GetSpacing()))
    shared = mask.sum() * voxel / reference_ml
    if shared < MIN_SHARED_BRAIN:
        raise BadInputError(f"the scans do not overlap in space: only {100 * shared:.0f} % of the reference scan's "
                            "brain lies inside this one; give contrasts of one session (same physical space)")
    signal = (mask & foreground_mask(native)).sum() * voxel / reference_ml
    if signal < MIN_SHARED_BRAIN:
        raise BadInputError(f"this scan has signal in only {100 * signal:.0f} % of the reference scan's brain (a "
                            "limited field of view?): a fusion needs every contrast over the whole brain; detect on "
                            "the reference contrast alone")
    return mask, shared, signal


def preprocess_companion(native: sitk.Image, reference: Preprocessed, reference_native: sitk.Image,
                         config: PreprocessConfig, reporter: Reporter) -> Preprocessed:
    """Another contrast of the reference scan's session onto the same grid, registered once: scans of one session
    share physical space, so the reference's brain mask (resampled through physical space onto this scan's
    voxels) and its template transform serve here too; only N4 and the standardisation are this scan's own.
    Refuses a scan that does not hold the reference brain (another session, or a header that places it apart)."""
    rec = _Recorder()
    t = time.perf_counter()
    mask, shared, signal = companion_coverage(native, reference, reference_native)
    rec.add("brain-mask", True, t, method="the reference scan's, through physical space", shared_brain=round(
        float(shared), 4), brain_with_signal=round(float(signal), 4))
    stripped = _apply_mask(native, mask)
    small, small_mask = working_copy(stripped, mask, min(reference.grid.spacing))
    field = _bias_field(small, small_mask, config, rec, reporter.sub(0.0, 0.8))
    t = time.perf_counter()
    # The reference transform maps template points to physical points, which both scans share.
    raw = _on_grid(stripped, field, reference.grid.reference(), reference.transform)
    rec.add("resample", True, t, grid=reference.grid.to_dict(), transform="the reference scan's")
    t = time.perf_counter()
    contrast = estimate_contrast(raw, reference.mask, reference.grid).to_dict()
    rec.add("contrast", True, t, **contrast)
    t = time.perf_counter()
    image, info = standardise(raw, reference.mask, config, reference.grid)
    rec.add("normalise", True, t, **info)
    reporter("normalise", 1.0)
    return Preprocessed(image, reference.mask, mask, reference.transform, reference.grid, rec.steps, raw_image=raw,
                        contrast=contrast,
                        acquisition_mm=voxel_extent_on_grid(native, reference.transform, reference.grid))

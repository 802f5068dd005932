"""Affine registration of a skull-stripped scan to the template brain (SimpleITK, multi-resolution, seeded)."""

from __future__ import annotations

import itertools
from typing import Optional

import numpy as np
import SimpleITK as sitk

from ..core.errors import BadInputError
from ..core.progress import Reporter
from .itkrun import REGISTRATION_THREADS, WORK_UNITS, execute_cancellable, itk_threads

SEED = 20240611


# A start other than the plain centre-of-mass alignment is taken only when its coarse fit beats that one's by more
# than this share of the metric: scans in the usual orientation keep exactly the start they always had.
ROTATED_START_GAIN = 0.05
COARSE_CANDIDATES = 3
COARSE_ITERATIONS = 60


def _cube_rotations() -> list:
    """The 24 proper rotations that map the coordinate axes onto themselves (identity first)."""
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            m = np.zeros((3, 3))
            m[range(3), perm] = signs
            if np.linalg.det(m) > 0:
                out.append(m)
    out.sort(key=lambda m: -np.trace(m))  # identity (trace 3) first
    return out


def _method(fixed_mask: sitk.Image, iterations: int, seed: int, shrink=(4, 2, 1),
            smooth=(2, 1, 0), min_step: float = 1e-4) -> sitk.ImageRegistrationMethod:
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfWorkUnits(WORK_UNITS)
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, seed)
    reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=min_step, numberOfIterations=iterations,
                                                 relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel(list(smooth))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    return reg


def _coarsest(image: sitk.Image) -> sitk.Image:
    """The image as the coarsest level sees it (smoothed by 2 voxels, shrunk 4 times), made once: a registration
    method rebuilds its pyramid from the full volume on every call, which for 24 start candidates costs minutes."""
    return sitk.Shrink(sitk.SmoothingRecursiveGaussian(image, 2.0 * min(image.GetSpacing())), [4, 4, 4])


def _starts(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image, seed: int,
            reporter: Reporter) -> tuple[sitk.AffineTransform, dict]:
    """Centre-of-mass alignment, rotated by whichever of the 24 right-angle rotations fits best.

    A head lying 90 degrees off, or a scan whose header orientation is wrong, defeats a gradient descent started
    from the plain alignment; each rotation is scored at the coarsest level, the few best are refined briefly
    there, and a rotated start is kept only when it clearly beats the plain one."""
    centred = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    centred = sitk.AffineTransform(centred)
    centre = np.array(centred.GetCenter())
    target = centre + np.array(centred.GetTranslation())  # the moving image's centre of mass

    def rotated(m: np.ndarray) -> sitk.AffineTransform:
        t = sitk.AffineTransform(3)
        t.SetCenter(centre.tolist())
        t.SetMatrix(m.ravel().tolist())
        t.SetTranslation((target - centre).tolist())
        return t

    candidates = [rotated(m) for m in _cube_rotations()]
    fixed_small, moving_small = _coarsest(fixed), _coarsest(moving)
    coarse = []
    for k, t in enumerate(candidates):
        reg = _method(fixed_mask, 1, seed, shrink=(1,), smooth=(0,))
        reg.SetInitialTransform(t, inPlace=False)
        try:
            coarse.append((reg.MetricEvaluate(fixed_small, moving_small), k))
        except RuntimeError:  # this rotation puts the scan outside the template: no candidate
            continue
        reporter("register", 0.1 * (k + 1) / len(candidates))
    ranked = [k for _, k in sorted(coarse)]
    if not ranked or ranked[0] == 0:
        return centred, {"start_rotation": None}
    shortlist = {0} | set(ranked[:COARSE_CANDIDATES])
    refined = {}
    for k in sorted(shortlist):
        reg = _method(fixed_mask, COARSE_ITERATIONS, seed, shrink=(1,), smooth=(0,))
        reg.SetInitialTransform(candidates[k], inPlace=False)
        try:
            reg.Execute(fixed_small, moving_small)
            refined[k] = reg.GetMetricValue()
        except RuntimeError:
            continue
    best = min(refined, key=refined.get) if refined else 0
    plain = refined.get(0)
    if plain is not None and best != 0 and refined[best] > plain - ROTATED_START_GAIN * abs(plain):
        best = 0
    return (centred if best == 0 else candidates[best],
            {"start_rotation": [int(v) for v in _cube_rotations()[best].ravel()],
             "start_metrics": {str(k): round(float(v), 5) for k, v in sorted(refined.items())}})


def register_affine(moving: sitk.Image, moving_mask: np.ndarray, fixed: sitk.Image, fixed_mask: np.ndarray,
                    reporter: Reporter, iterations: int = 200, seed: int = SEED,
                    coarse: Optional[tuple[sitk.Image, np.ndarray]] = None) -> tuple[sitk.AffineTransform, dict]:
    """Return the affine transform that maps template (fixed) points onto scan (moving) points.

    `coarse`, (image, brain mask) of the same scan binned to about the template grid's spacing, serves the start
    search and the two coarse levels in place of `moving` (the last level always sees `moving`'s own voxels).
    Raises BadInputError when no alignment with the template brain can be found."""
    with itk_threads(REGISTRATION_THREADS):
        return _register(moving, moving_mask, fixed, fixed_mask, reporter, iterations, seed, coarse)


# The pyramid as levels of the template grid: shrink factors and smoothing (voxels). The coarse levels run as one
# registration on the binned copy, the last as another on the input's voxels: each level of an ITK registration
# smooths the moving image and computes its gradient image anew, which on a 1 mm BraTS scan took about as long as
# that level's 200 iterations on the 4 and 8 mm grids. The last level's own run draws other metric samples than it
# did as the third level of one registration, which moved the grid's corners by 0.95 and 1.3 mm on two BraTS T1
# against CHAIN_VERSION 6; whether its coarse levels saw the binned copy or the input's voxels changed that by 0.005 mm.
COARSE_SHRINK, COARSE_SMOOTH = (4, 2), (2, 1)
# The last level stops once its step falls below this: its iterations cost about 7 times those of the 4 mm level,
# and the steps below it changed the corners' displacement from version 6 by at most 0.03 mm on two BraTS T1.
LAST_MIN_STEP = 1e-3
# The coarse levels only seed the last one, and stop at the same step: at 1e-4 instead they took 0.2-0.45 s longer
# on three BraTS scans for a final transform that moved the grid's corners by at most 0.06 mm.
COARSE_MIN_STEP = 1e-3


def _register(moving: sitk.Image, moving_mask: np.ndarray, fixed: sitk.Image, fixed_mask: np.ndarray,
              reporter: Reporter, iterations: int, seed: int,
              coarse: Optional[tuple[sitk.Image, np.ndarray]]) -> tuple[sitk.AffineTransform, dict]:
    moving_masked = _masked(moving, moving_mask)
    coarse_masked = _masked(*coarse) if coarse is not None else moving_masked
    fixed_masked = _masked(fixed, fixed_mask)
    fixed_mask_img = sitk.GetImageFromArray(fixed_mask.astype(np.uint8))
    fixed_mask_img.CopyInformation(fixed)
    fixed_mask_img = sitk.BinaryDilate(fixed_mask_img, [2, 2, 2])
    initial, start = _starts(fixed_masked, coarse_masked, fixed_mask_img, seed, reporter)
    count = [0]

    def tick():
        count[0] += 1
        reporter("register", min(0.1 + count[0] / (3 * iterations), 0.99))

    transform = initial
    for image, shrink, smooth, min_step in ((coarse_masked, COARSE_SHRINK, COARSE_SMOOTH, COARSE_MIN_STEP),
                                            (moving_masked, (1,), (0,), LAST_MIN_STEP)):
        reg = _method(fixed_mask_img, iterations, seed, shrink, smooth, min_step)
        reg.SetInitialTransform(transform, inPlace=False)
        try:
            transform = _as_affine(execute_cancellable(reg, reporter, "register", fixed_masked, image,
                                                       abort=reg.StopRegistration, on_iteration=tick))
        except RuntimeError:
            # ITK stops when the scan drifts off the template (too few samples overlap): no brain alignment exists.
            raise BadInputError("registration to the template brain failed: the scan could not be aligned with a "
                                "brain (is it a whole-brain MRI?)") from None
    return transform, {"metric": round(float(reg.GetMetricValue()), 5), "iterations": count[0],
                       "stop": reg.GetOptimizerStopConditionDescription(), "seed": seed, **start}


def _masked(image: sitk.Image, mask: np.ndarray) -> sitk.Image:
    """The brain on a background of its own lowest value, lifted to 0 where that is negative: the centre-of-mass
    start weighs voxels by intensity, so a z-scored scan's negative values would pull it anywhere (mutual
    information does not care about the shift; scans with non-negative brains are passed as they were)."""
    arr = sitk.GetArrayFromImage(image)
    low = float(arr[mask].min())
    arr = arr - min(low, 0.0)
    out = sitk.GetImageFromArray(np.where(mask, arr, max(low, 0.0)).astype(np.float32))
    out.CopyInformation(image)
    return out


def _as_affine(transform: sitk.Transform) -> sitk.AffineTransform:
    """Flatten a composite result into one AffineTransform (it stores and inverts exactly)."""
    if isinstance(transform, sitk.CompositeTransform):
        transform = transform.GetNthTransform(0) if transform.GetNumberOfTransforms() == 1 else transform
        if isinstance(transform, sitk.CompositeTransform):
            transform.FlattenTransform()
            transform = transform.GetNthTransform(0)
    return sitk.AffineTransform(transform)


def affine_to_dict(t: sitk.AffineTransform) -> dict:
    return {"matrix": list(t.GetMatrix()), "translation": list(t.GetTranslation()), "center": list(t.GetCenter())}


def affine_from_dict(d: dict) -> sitk.AffineTransform:
    """The transform affine_to_dict wrote (JSON keeps every double exactly)."""
    t = sitk.AffineTransform(3)
    t.SetCenter([float(v) for v in d["center"]])
    t.SetMatrix([float(v) for v in d["matrix"]])
    t.SetTranslation([float(v) for v in d["translation"]])
    return t

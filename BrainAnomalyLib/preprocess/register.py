"""Affine registration of a skull-stripped scan to the template brain (SimpleITK, multi-resolution, seeded)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..core.progress import Reporter
from .itkrun import execute_cancellable

SEED = 20240611


def register_affine(moving: sitk.Image, moving_mask: np.ndarray, fixed: sitk.Image, fixed_mask: np.ndarray,
                    reporter: Reporter, iterations: int = 200, seed: int = SEED) -> tuple[sitk.AffineTransform, dict]:
    """Return the affine transform that maps template (fixed) points onto scan (moving) points."""
    moving_masked = _masked(moving, moving_mask)
    fixed_masked = _masked(fixed, fixed_mask)
    initial = sitk.CenteredTransformInitializer(fixed_masked, moving_masked, sitk.AffineTransform(3),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.2, seed)
    fixed_mask_img = sitk.GetImageFromArray(fixed_mask.astype(np.uint8))
    fixed_mask_img.CopyInformation(fixed)
    reg.SetMetricFixedMask(sitk.BinaryDilate(fixed_mask_img, [2, 2, 2]))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=iterations,
                                                 relaxationFactor=0.5, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2, 1, 0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    reg.SetInitialTransform(initial, inPlace=False)
    count = [0]

    def tick():
        count[0] += 1
        reporter("register", min(count[0] / (3 * iterations), 0.99))

    result = execute_cancellable(reg, reporter, "register", fixed_masked, moving_masked,
                                 abort=reg.StopRegistration, on_iteration=tick)
    affine = _as_affine(result)
    return affine, {"metric": round(float(reg.GetMetricValue()), 5), "iterations": count[0],
                    "stop": reg.GetOptimizerStopConditionDescription(), "seed": seed}


def _masked(image: sitk.Image, mask: np.ndarray) -> sitk.Image:
    arr = sitk.GetArrayFromImage(image)
    out = sitk.GetImageFromArray(np.where(mask, arr, arr[mask].min()).astype(np.float32))
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

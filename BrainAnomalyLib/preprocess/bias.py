"""N4 bias-field correction: fitted on a shrunken copy of the working image; the smooth field it finds is applied
where the scan is resampled onto the model grid (preprocess.chain), not at the input's full resolution."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..core.io import same_geometry
from ..core.progress import Reporter
from .itkrun import N4_THREADS, execute_cancellable, itk_threads

# Halving these caps cut the fit 2.7 times and changed a BraTS field by 1 %, but on the demo scan's strong synthetic
# field it let the lesion's Dice fall from 0.69 to 0.46 (Testing/test_geometry.py): the caps stay.
ITERATIONS = (50, 50, 30)
# A level ends early once the field changes by less than this between iterations (N4's convergence measure). At
# 1e-4 N4 never met it on brain scans and ran every cap; at 1e-3 a BraTS T1 took 90 of the 130 iterations, a BraTS
# FLAIR 36 and an IXI T1 76, the field's shape (its log, less its median over the brain) moving by at most 0.05,
# while a strong field, still changing, keeps its iterations.
CONVERGENCE = 1e-3
# Fitted at 8 mm instead (shrink 4 on the 2 mm working copy), N4 took 0.4-0.6 times as long, but the brats18_dev T1
# AUPRC of normative-t1-ixi fell by 0.0054 and of dae-t1-ixi by 0.0059 (docs/benchmark/chain9-brats18-dev.md).
FIT_SPACING_MM = 6.0


@dataclass
class BiasField:
    """A fitted N4 field: the log field on the image it was fitted for, and the offset that lifted the brain above
    zero (N4 works on log intensities)."""

    log_field: sitk.Image
    offset: float

    def corrected(self, values: np.ndarray, log_field: np.ndarray) -> np.ndarray:
        """`values` corrected by the field sampled at the same voxels; zero (outside the brain) stays zero."""
        return np.where(values != 0, (values + self.offset) * np.exp(-log_field) - self.offset,
                        0.0).astype(np.float32)

    def apply(self, image: sitk.Image) -> sitk.Image:
        """`image` corrected: the image the field was fitted on, or another grid of the same scan (the field,
        smooth, is interpolated onto it)."""
        log_field = self.log_field
        if not same_geometry(image, log_field):
            log_field = sitk.Resample(log_field, image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        out = sitk.GetImageFromArray(self.corrected(sitk.GetArrayViewFromImage(image),
                                                    sitk.GetArrayViewFromImage(log_field)))
        out.CopyInformation(image)
        return out


def fit_n4(image: sitk.Image, mask: np.ndarray, reporter: Reporter, target_spacing_mm: float = FIT_SPACING_MM,
           iterations=ITERATIONS) -> tuple[BiasField, dict]:
    """Fit N4 to the brain (`mask`) of `image` (outside it zero); the field comes back on `image`'s grid."""
    arr = sitk.GetArrayViewFromImage(image)
    inside = arr[mask]
    offset = float(max(0.0, -inside.min())) + 1e-3 * float(np.ptp(inside) or 1.0)
    positive = sitk.GetImageFromArray(np.where(mask, arr + offset, 0).astype(np.float32))
    positive.CopyInformation(image)
    mask_img = sitk.GetImageFromArray(mask.astype(np.uint8))
    mask_img.CopyInformation(image)

    shrink = [max(1, int(round(target_spacing_mm / s))) for s in image.GetSpacing()]
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(iterations))
    n4.SetConvergenceThreshold(CONVERGENCE)
    total = sum(iterations)
    count = [0]

    def tick():
        count[0] += 1
        reporter("bias-correct", min(count[0] / total, 1.0))

    # A fixed thread count: N4's result depends on it (preprocess/itkrun.py).
    with itk_threads(N4_THREADS):
        execute_cancellable(n4, reporter, "bias-correct", sitk.Shrink(positive, shrink),
                            sitk.Shrink(mask_img, shrink), on_iteration=tick)
        log_field = n4.GetLogBiasFieldAsImage(positive)
    field = np.exp(sitk.GetArrayViewFromImage(log_field)[mask])
    return BiasField(log_field, offset), {
        "shrink": shrink, "iterations": list(iterations),
        "field_range": [round(float(field.min()), 4), round(float(field.max()), 4)]}

"""The registration's coarse levels on a binned copy of the scan (preprocess.register's `coarse`): the last level,
on the scan's own voxels, must still find the known alignment, and the binned copy must really be what the coarse
levels see."""

import numpy as np
import SimpleITK as sitk

from BrainAnomalyLib.core.progress import Reporter
from BrainAnomalyLib.core.template import Grid, brain_mask_on_grid, template_on_grid
from BrainAnomalyLib.preprocess import register
from BrainAnomalyLib.preprocess.working_scale import working_copy


def _corner_error_mm(found: sitk.Transform, truth: sitk.Transform, ref: sitk.Image) -> float:
    size = np.array(ref.GetSize()) - 1
    corners = [ref.TransformContinuousIndexToPhysicalPoint([float(a * size[0]), float(b * size[1]),
                                                            float(c * size[2])])
               for a in (0, 1) for b in (0, 1) for c in (0, 1)]
    return max(float(np.linalg.norm(np.subtract(found.TransformPoint(p), truth.TransformPoint(p))))
               for p in corners)


def test_the_binned_copy_serves_the_coarse_levels(monkeypatch):
    grid = Grid(size=(48, 56, 40), spacing=(4.0, 4.0, 4.0))
    fixed = template_on_grid(grid)
    mask = brain_mask_on_grid(grid)
    # The template's brain, moved and slightly rotated, at 2 mm: the scan to align.
    shift = sitk.Euler3DTransform((0.0, 17.0, 5.0), 0.06, -0.04, 0.08, (4.0, -3.0, 6.0))
    scan_grid = Grid(size=(96, 112, 80), spacing=(2.0, 2.0, 2.0))
    ref = scan_grid.reference()
    inverse = shift.GetInverse()
    moving = sitk.Resample(template_on_grid(scan_grid), ref, inverse, sitk.sitkLinear, 0.0)
    moving_mask = sitk.GetArrayFromImage(sitk.Resample(_mask_image(brain_mask_on_grid(scan_grid), ref), ref,
                                                       inverse, sitk.sitkNearestNeighbor, 0)).astype(bool)
    coarse = working_copy(moving, moving_mask, 4.0)
    assert coarse[0].GetSpacing() == (4.0, 4.0, 4.0)

    seen = []
    run = register.execute_cancellable

    def spy(obj, reporter, step, fixed_image, moving_image, **kw):
        seen.append(moving_image.GetSpacing())
        return run(obj, reporter, step, fixed_image, moving_image, **kw)

    monkeypatch.setattr(register, "execute_cancellable", spy)
    found, _ = register.register_affine(moving, moving_mask, fixed, mask, Reporter(), coarse=coarse)
    assert seen == [(4.0, 4.0, 4.0), (2.0, 2.0, 2.0)]
    # Template points map onto scan points through `shift` (the scan is the template moved by its inverse).
    assert _corner_error_mm(found, shift, fixed) < 2.0


def _mask_image(mask: np.ndarray, ref: sitk.Image) -> sitk.Image:
    img = sitk.GetImageFromArray(mask.astype(np.uint8))
    img.CopyInformation(ref)
    return img

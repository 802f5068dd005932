"""The registration's thread count is a speed setting only: the metric sums in one work unit, so the transform must
not depend on how many threads the rest of the registration uses (outputs are byte-identical in any process)."""

import numpy as np
import SimpleITK as sitk

from BrainAnomalyLib.core.progress import Reporter
from BrainAnomalyLib.core.template import Grid, brain_mask_on_grid, template_on_grid
from BrainAnomalyLib.preprocess import register
from BrainAnomalyLib.preprocess.working_scale import working_copy


def test_two_threads_give_the_transform_of_one(monkeypatch):
    grid = Grid(size=(48, 56, 40), spacing=(4.0, 4.0, 4.0))
    fixed = template_on_grid(grid)
    mask = brain_mask_on_grid(grid)
    # The template's brain, moved and slightly rotated, as the scan to align.
    shift = sitk.Euler3DTransform((0.0, 17.0, 5.0), 0.06, -0.04, 0.08, (4.0, -3.0, 6.0))
    moving = sitk.Resample(fixed, fixed, shift, sitk.sitkLinear, 0.0)
    mask_img = sitk.GetImageFromArray(mask.astype(np.uint8))
    mask_img.CopyInformation(fixed)  # the template's geometry, so the mask moves with the brain it outlines
    moving_mask = sitk.GetArrayFromImage(sitk.Resample(mask_img, fixed, shift, sitk.sitkNearestNeighbor,
                                                       0)).astype(bool)
    params = []
    for threads in (1, 2, 2):
        monkeypatch.setattr(register, "REGISTRATION_THREADS", threads)
        # As the chain calls it: the start search and coarse levels on a binned copy.
        transform, _ = register.register_affine(moving, moving_mask, fixed, mask, Reporter(),
                                                coarse=working_copy(moving, moving_mask, 8.0))
        params.append(np.array(transform.GetParameters()))
    assert np.abs(params[0][:9] - np.eye(3).ravel()).max() > 0.01  # it did have to rotate
    np.testing.assert_array_equal(params[1], params[0])
    np.testing.assert_array_equal(params[2], params[0])

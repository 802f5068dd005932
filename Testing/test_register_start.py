"""The registration's start on scans whose brain holds negative values (z-scored over the field of view, as
MNI-space research pipelines deliver them): the centre-of-mass start weighs voxels by intensity, and must still find
the brain where it is."""

import numpy as np
import SimpleITK as sitk

from BrainAnomalyLib.core.template import Grid, brain_mask_on_grid, template_on_grid
from BrainAnomalyLib.preprocess.register import _masked


def _centre_of_mass_start(image: sitk.Image, mask: np.ndarray, fixed: sitk.Image) -> np.ndarray:
    start = sitk.CenteredTransformInitializer(fixed, _masked(image, mask), sitk.AffineTransform(3),
                                              sitk.CenteredTransformInitializerFilter.MOMENTS)
    return np.array(sitk.AffineTransform(start).GetTranslation())


def test_a_z_scored_scan_starts_on_its_brain():
    grid = Grid()
    fixed = template_on_grid(grid)
    mask = brain_mask_on_grid(grid)
    arr = sitk.GetArrayFromImage(fixed).astype(np.float32)
    # The brain, moved 10 mm off the template's place, on a zero background.
    moved = np.where(mask, arr, 0.0)
    moved = np.roll(moved, 5, axis=2)
    moved_mask = np.roll(mask, 5, axis=2)
    positive = sitk.GetImageFromArray(moved)
    positive.CopyInformation(fixed)
    z = sitk.GetImageFromArray(((moved - moved.mean()) / moved.std()).astype(np.float32))
    z.CopyInformation(fixed)
    assert float(sitk.GetArrayViewFromImage(z).min()) < 0
    # Template points map to scan points 10 mm further along the array's x axis (the grid's x runs to -x).
    np.testing.assert_allclose(_centre_of_mass_start(z, moved_mask, fixed), [-10.0, 0.0, 0.0], atol=1.0)
    # The non-negative scan is passed through unchanged.
    np.testing.assert_array_equal(sitk.GetArrayFromImage(_masked(positive, moved_mask)),
                                  np.where(moved_mask, moved, moved[moved_mask].min()))

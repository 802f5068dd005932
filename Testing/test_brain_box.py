"""The brain's bounding box that the registration's last level sees (preprocess.chain.brain_box): the same voxels
at the same physical positions, and the same alignment as from the whole volume."""

import numpy as np
import SimpleITK as sitk

from BrainAnomalyLib.core.progress import Reporter
from BrainAnomalyLib.core.template import Grid, brain_mask_on_grid, template_on_grid
from BrainAnomalyLib.preprocess import register
from BrainAnomalyLib.preprocess.chain import brain_box
from BrainAnomalyLib.preprocess.working_scale import working_copy


def _image(arr: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0)) -> sitk.Image:
    img = sitk.GetImageFromArray(arr.astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    return img


def test_the_box_holds_the_brain_and_its_margin_at_the_same_positions():
    mask = np.zeros((60, 80, 90), bool)
    mask[20:30, 30:50, 1:40] = True
    values = np.where(mask, np.arange(mask.size).reshape(mask.shape) % 97 + 1.0, 0.0)
    image = _image(values, spacing=(2.0, 1.0, 0.5), origin=(-10.0, 4.0, 7.0))  # x, y, z spacing
    box, box_mask = brain_box(image, mask, margin_mm=4.0)
    # margins in voxels: z 8 (0.5 mm), y 4, x 2; the brain starts at x = 1, so that side stops at the image's edge
    assert box.GetSize() == (42, 28, 26)
    assert box_mask.shape == sitk.GetArrayViewFromImage(box).shape and box_mask.sum() == mask.sum()
    first = box.TransformIndexToPhysicalPoint((0, 0, 0))
    assert np.allclose(first, image.TransformIndexToPhysicalPoint((0, 26, 12)))
    assert np.array_equal(sitk.GetArrayViewFromImage(box), values[12:38, 26:54, 0:42])


def test_a_volume_the_box_would_not_cut_comes_back_as_it_was():
    mask = np.zeros((10, 10, 10), bool)
    image = _image(np.zeros(mask.shape))
    assert brain_box(image, mask)[0] is image
    mask[2:8, 2:8, 2:8] = True
    assert brain_box(image, mask, margin_mm=3.0)[0] is image


def test_the_last_level_aligns_the_box_as_it_aligned_the_whole_volume():
    grid = Grid(size=(48, 56, 40), spacing=(4.0, 4.0, 4.0))
    fixed = template_on_grid(grid)
    # The template's brain, moved and slightly rotated, at 2 mm inside a field of view much larger than the head.
    shift = sitk.Euler3DTransform((0.0, 17.0, 5.0), 0.06, -0.04, 0.08, (4.0, -3.0, 6.0))
    scan_grid = Grid(size=(140, 150, 120), spacing=(2.0, 2.0, 2.0))
    ref = scan_grid.reference()
    moving = sitk.Resample(template_on_grid(Grid(size=(96, 112, 80))), ref, shift.GetInverse(), sitk.sitkLinear, 0.0)
    moving_mask = sitk.GetArrayFromImage(moving) > 0
    coarse = working_copy(moving, moving_mask, 4.0)
    boxed, boxed_mask = brain_box(moving, moving_mask)
    assert np.prod(boxed.GetSize()) < 0.6 * np.prod(moving.GetSize())
    whole, _ = register.register_affine(moving, moving_mask, fixed, brain_mask_on_grid(grid), Reporter(),
                                        coarse=coarse)
    found, _ = register.register_affine(boxed, boxed_mask, fixed, brain_mask_on_grid(grid), Reporter(),
                                        coarse=coarse)
    assert np.allclose(found.GetParameters(), whole.GetParameters(), rtol=0, atol=1e-5)

"""Scanner-mimicking augmentation: seeded, changes intensities, keeps masks aligned with the anatomy."""

import numpy as np
import SimpleITK as sitk

from BrainAnomalyLib.augment import AugmentConfig, Augmenter, thick_slice
from BrainAnomalyLib.template import Grid, brain_mask_on_grid, template_on_grid


def _scan():
    image = sitk.GetArrayFromImage(template_on_grid(Grid())) * 100.0
    return image.astype(np.float32), brain_mask_on_grid(Grid())


def test_same_seed_same_result_and_intensities_change():
    image, mask = _scan()
    a, ma = Augmenter(AugmentConfig(prob=1.0), seed=3)(image, mask)
    b, mb = Augmenter(AugmentConfig(prob=1.0), seed=3)(image, mask)
    c, _ = Augmenter(AugmentConfig(prob=1.0), seed=4)(image, mask)
    assert np.array_equal(a, b) and np.array_equal(ma, mb)
    assert not np.allclose(a, c)
    assert np.abs(a - image)[mask & ma].mean() > 1.0


def test_mask_follows_the_anatomy_under_the_affine_jitter():
    image, mask = _scan()
    marker = np.zeros_like(mask)
    marker[40:46, 50:56, 44:50] = True
    bright = np.where(marker, 1000.0, image).astype(np.float32)
    # every intensity transform neutral: only the affine jitter acts
    cfg = AugmentConfig(prob=1.0, gamma=(1.0, 1.0), contrast=(1.0, 1.0), bias_coeff=0.0, noise_std=(0.0, 0.0),
                        thick_slice=(1.0, 1.0), rotate_deg=6.0, translate_vox=3.0)
    moved, moved_mask = Augmenter(cfg, seed=7)(bright, mask)
    assert (moved_mask != mask).sum() > 1000  # it really moved
    # the moved mask still covers the moved brain: tissue inside, nothing bright left outside
    tissue = image[mask] > 20
    assert (moved[moved_mask] > 20).mean() > 0.95 * tissue.mean()
    assert (moved[~moved_mask] > 20).sum() == 0
    # and the marker moved with it: its bright voxels are still inside the brain mask
    assert (moved > 900).sum() > 0.3 * marker.sum() and moved_mask[moved > 900].all()  # edges blur


def test_intensity_transforms_leave_the_mask_unchanged():
    image, mask = _scan()
    cfg = AugmentConfig(prob=1.0, rotate_deg=0.0, translate_vox=0.0, scale=0.0)
    out, out_mask = Augmenter(cfg, seed=1)(image, mask)
    assert np.array_equal(out_mask, mask)


def test_thick_slice_blurs_only_along_its_axis():
    rng = np.random.default_rng(0)
    image = np.zeros((40, 40, 40), np.float32)
    image[20, :, :] = 1.0  # a sheet across z
    out = thick_slice(image, 4.0, axis=0, rng=rng)
    assert out[:, 20, 20].max() < 1.0 and (out[:, 20, 20] > 0.05).sum() > 2  # spread along z
    assert np.allclose(out[:, 20, 20], out[:, 10, 30])  # unchanged across y, x

"""The grid-resolution working copy that N4 sees, the N4 field applied on other grids of the scan, and the
preprocessing cache following the chain's version."""

import numpy as np
import SimpleITK as sitk

from BrainAnomalyLib.core.progress import Reporter
from BrainAnomalyLib.core.template import Grid
from BrainAnomalyLib.preprocess import chain
from BrainAnomalyLib.preprocess.bias import fit_n4
from BrainAnomalyLib.preprocess.working_scale import working_copy, working_factors
from BrainAnomalyLib.store.cache import cache_key


def _ball(size=(40, 40, 30), spacing=(1.0, 1.0, 1.0), radius=12.0):
    zz, yy, xx = np.indices(size[::-1]).astype(float)
    c = (np.array(size[::-1]) - 1) / 2
    mask = (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= radius ** 2
    arr = np.where(mask, 100.0 + xx, 0.0).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    return img, mask


def test_factors_bin_to_at_most_the_target_spacing():
    assert working_factors((1.0, 1.0, 1.0), 2.0) == [2, 2, 2]
    assert working_factors((0.9375, 0.9375, 1.2), 2.0) == [2, 2, 1]
    assert working_factors((2.0, 2.0, 2.0), 2.0) == [1, 1, 1]
    assert working_factors((0.5, 0.5, 3.0), 2.0) == [4, 4, 1]


def test_working_copy_averages_brain_voxels_only():
    img, mask = _ball()
    small, small_mask = working_copy(img, mask, 2.0)
    assert small.GetSize() == (20, 20, 15) and small.GetSpacing() == (2.0, 2.0, 2.0)
    # the physical centre stays where it was
    centre = img.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in img.GetSize()])
    small_centre = small.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in small.GetSize()])
    np.testing.assert_allclose(centre, small_centre)
    arr = sitk.GetArrayFromImage(small)
    # a bin on the brain's edge holds the mean of its brain voxels (100 + x), not a mix with the zero background
    inside = arr[arr > 0]
    assert inside.min() >= 100.0 and inside.max() <= 140.0
    assert abs(small_mask.sum() * 8 - mask.sum()) / mask.sum() < 0.1
    same, same_mask = working_copy(*_ball(spacing=(2.0, 2.0, 2.0)), 2.0)
    assert same.GetSize() == (40, 40, 30) and same_mask.sum() == _ball()[1].sum()


def test_bias_field_corrects_a_smooth_field_and_keeps_the_background():
    img, mask = _ball(radius=14.0)
    arr = sitk.GetArrayFromImage(img)
    flat = np.where(mask, 100.0, 0.0).astype(np.float32)
    zz, yy, xx = np.indices(arr.shape)
    gain = np.exp(0.2 * (xx - xx.mean()) / xx.std())
    biased = sitk.GetImageFromArray((flat * gain).astype(np.float32))
    biased.CopyInformation(img)
    field, info = fit_n4(biased, mask, Reporter(), target_spacing_mm=2.0, iterations=(50, 50))
    out = sitk.GetArrayFromImage(field.apply(biased))
    assert np.all(out[~mask] == 0)
    spread = lambda a: float(np.std(a[mask]) / np.mean(a[mask]))  # noqa: E731
    assert spread(out) < 0.5 * spread(flat * gain)
    assert info["iterations"] == [50, 50]


def test_field_fitted_on_the_working_copy_corrects_the_full_resolution_scan():
    """The registration sees the input's own voxels, corrected by the field N4 fitted on the working copy."""
    img, mask = _ball(size=(48, 48, 36), radius=16.0)
    flat = np.where(mask, 100.0, 0.0).astype(np.float32)
    xx = np.indices(flat.shape)[2]
    biased = sitk.GetImageFromArray((flat * np.exp(0.2 * (xx - xx.mean()) / xx.std())).astype(np.float32))
    biased.CopyInformation(img)
    small, small_mask = working_copy(biased, mask, 2.0)
    field, _ = fit_n4(small, small_mask, Reporter(), target_spacing_mm=4.0, iterations=(50, 50))
    out = field.apply(biased)
    assert out.GetSize() == biased.GetSize() and out.GetSpacing() == biased.GetSpacing()
    arr = sitk.GetArrayFromImage(out)
    assert np.all(arr[~mask] == 0)
    spread = lambda a: float(np.std(a[mask]) / np.mean(a[mask]))  # noqa: E731
    assert spread(arr) < 0.5 * spread(sitk.GetArrayFromImage(biased))


def test_cache_key_follows_the_chain_version(tmp_path, monkeypatch):
    scan = tmp_path / "scan.nii.gz"
    sitk.WriteImage(_ball()[0], str(scan))
    key = cache_key(scan, chain.PreprocessConfig(), Grid())
    monkeypatch.setattr("BrainAnomalyLib.store.cache.CHAIN_VERSION", chain.CHAIN_VERSION + 1)
    assert cache_key(scan, chain.PreprocessConfig(), Grid()) != key

"""Evaluation's preprocessing cache gives back what preprocessing gave, registration and native brain mask included,
so a run over the same scans again skips preprocessing without changing a number."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from BrainAnomalyLib.core.template import Grid
from BrainAnomalyLib.core.progress import Reporter
from BrainAnomalyLib.preprocess.chain import PreprocessConfig, preprocess_companion, standardise
from BrainAnomalyLib.store import cache as cache_module
from BrainAnomalyLib.store.cache import cached_companion, cached_preprocessed


def _coarse(scan: sitk.Image, mm: float = 3.0) -> sitk.Image:
    size = [int(n * s / mm) for n, s in zip(scan.GetSize(), scan.GetSpacing())]
    return sitk.Resample(scan, size, sitk.Transform(), sitk.sitkLinear, scan.GetOrigin(), [mm] * 3,
                         scan.GetDirection())


def test_a_cached_scan_comes_back_as_preprocessing_made_it(tmp_path, demo_case, monkeypatch):
    scan = _coarse(demo_case[0])
    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(scan, str(path))
    config, grid = PreprocessConfig(normalisation="tissue-peaks", bias_correction=False), Grid()
    first = cached_preprocessed(path, scan, config, grid, tmp_path / "cache")
    assert sorted(p.name.endswith(".native.npz") for p in (tmp_path / "cache").iterdir()) == [False, True]
    np.testing.assert_array_equal(first.image, standardise(first.raw_image, first.mask, config, grid)[0])

    def no_preprocessing(*args, **kwargs):
        raise AssertionError("the cached scan was preprocessed again")

    monkeypatch.setattr(cache_module, "preprocess", no_preprocessing)
    again = cached_preprocessed(path, scan, config, grid, tmp_path / "cache")
    np.testing.assert_array_equal(again.image, first.image)
    np.testing.assert_array_equal(again.mask, first.mask)
    np.testing.assert_array_equal(again.native_mask, first.native_mask)
    assert again.native_mask.any() and again.native_mask.shape == first.native_mask.shape
    assert again.transform.GetParameters() == first.transform.GetParameters()
    assert again.transform.GetFixedParameters() == first.transform.GetFixedParameters()
    assert again.contrast == first.contrast and again.notes == first.notes
    assert again.acquisition_mm == first.acquisition_mm and first.acquisition_mm is not None

    # Another scan of another size under the same key (a file rewritten in place) is not given the old mask.
    other = _coarse(demo_case[0], 4.0)
    with pytest.raises(AssertionError, match="preprocessed again"):
        cached_preprocessed(path, other, config, grid, tmp_path / "cache")


def test_a_cached_scan_is_judged_by_todays_limits(tmp_path, demo_case):
    """An entry written before the registration's scaling_ratio was measured: its squeezed registration is refused
    on loading, as the same scan preprocessed now would be."""
    import json

    from BrainAnomalyLib.core.errors import BadInputError

    scan = _coarse(demo_case[0])
    path = tmp_path / "scan.nii.gz"
    sitk.WriteImage(scan, str(path))
    config, grid = PreprocessConfig(bias_correction=False), Grid()
    fresh = cached_preprocessed(path, scan, config, grid, tmp_path / "cache")
    assert next(s for s in fresh.record if s["step"] == "sanity")["scaling_ratio"] > 0.8
    entry = next(p for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".native.npz"))
    with np.load(entry) as data:
        arrays = {k: data[k] for k in data.files}
    record = json.loads(str(arrays["record"]))
    for step in record:
        if step["step"] == "register":
            step["transform"]["matrix"] = list(np.diag([1.0, 1.0, 0.5]).ravel())
        step.pop("scaling_ratio", None)
    np.savez_compressed(entry, **dict(arrays, record=np.array(json.dumps(record))))
    with pytest.raises(BadInputError, match="smallest / largest stretch 0.5 is below 0.6"):
        cached_preprocessed(path, scan, config, grid, tmp_path / "cache")


def test_a_cached_companion_comes_back_as_preprocess_companion_made_it(tmp_path, demo_case, monkeypatch):
    scan = _coarse(demo_case[0])
    # another contrast of the same session: same space, other intensities
    companion = sitk.Cast(sitk.InvertIntensity(sitk.Cast(scan, sitk.sitkFloat32), 1000.0) * sitk.Cast(scan > 0,
                          sitk.sitkFloat32), sitk.sitkFloat32)
    ref_path, comp_path = tmp_path / "t1.nii.gz", tmp_path / "t2.nii.gz"
    sitk.WriteImage(scan, str(ref_path))
    sitk.WriteImage(companion, str(comp_path))
    # N4 (the slowest step here) is not what the cache is about: it is left out to keep the test quick
    config, grid = PreprocessConfig(bias_correction=False), Grid()
    reference = cached_preprocessed(ref_path, scan, config, grid, tmp_path / "cache")
    fresh = preprocess_companion(companion, reference, scan, config, Reporter())
    first = cached_companion(comp_path, companion, reference, scan, ref_path, config, config, None, tmp_path / "cache")
    np.testing.assert_array_equal(first.image, fresh.image)

    def no_preprocessing(*args, **kwargs):
        raise AssertionError("the cached companion was preprocessed again")

    monkeypatch.setattr(cache_module, "preprocess_companion", no_preprocessing)
    again = cached_companion(comp_path, companion, reference, scan, ref_path, config, config, None,
                             tmp_path / "cache")
    for got in (first, again):
        np.testing.assert_array_equal(got.image, fresh.image)
        np.testing.assert_array_equal(got.raw_image, fresh.raw_image)
        np.testing.assert_array_equal(got.native_mask, fresh.native_mask)
        assert got.mask is reference.mask and got.transform is reference.transform
        assert got.contrast == fresh.contrast and [s["step"] for s in got.record] == [s["step"] for s in fresh.record]
    # another reference scan is another pair: preprocessed again
    sitk.WriteImage(_coarse(demo_case[0], 3.5), str(ref_path))
    with pytest.raises(AssertionError, match="preprocessed again"):
        cached_companion(comp_path, companion, reference, scan, ref_path, config, config, None, tmp_path / "cache")

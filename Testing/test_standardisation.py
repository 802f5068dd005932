"""Intensity standardisation: invariant to a global scale and offset of the scan, and idempotent."""

import numpy as np
import pytest

from BrainAnomalyLib.preprocess.normalise import fit_histogram_reference, histogram_landmarks, normalise
from BrainAnomalyLib.core.template import Grid, brain_mask_on_grid, template_on_grid, tissue_on_grid


@pytest.fixture(scope="module")
def scan():
    import SimpleITK as sitk

    grid = Grid()
    rng = np.random.default_rng(0)
    image = sitk.GetArrayFromImage(template_on_grid(grid)) * 800 + 60 + 10 * rng.standard_normal(
        tuple(reversed(grid.size)))
    return image.astype(np.float32), brain_mask_on_grid(grid), tissue_on_grid(grid)


def _reference(scan):
    image, mask, _ = scan
    rng = np.random.default_rng(1)
    # a cohort: the same anatomy under different gamma-like contrasts
    cohort = [np.sign(image) * np.abs(image) ** g for g in rng.uniform(0.8, 1.2, 5)]
    return fit_histogram_reference(histogram_landmarks(c, mask) for c in cohort)


@pytest.mark.parametrize("method", ["median-iqr", "percentile", "tissue-peaks", "histogram"])
def test_invariant_to_global_scale_and_offset(scan, method):
    image, mask, tissue = scan
    ref = _reference(scan) if method == "histogram" else None
    a, _ = normalise(image, mask, method, ref, tissue)
    b, _ = normalise(image * 3.7 - 250.0, mask, method, ref, tissue)
    assert np.allclose(a[mask], b[mask], atol=1e-3)


@pytest.mark.parametrize("method", ["median-iqr", "percentile", "tissue-peaks", "histogram"])
def test_idempotent_on_standardised_input(scan, method):
    image, mask, tissue = scan
    ref = _reference(scan) if method == "histogram" else None
    once, _ = normalise(image, mask, method, ref, tissue)
    twice, _ = normalise(once, mask, method, ref, tissue)
    assert np.allclose(once[mask], twice[mask], atol=2e-3)


def test_tissue_peaks_put_grey_matter_at_0_and_white_matter_at_1(scan):
    image, mask, tissue = scan
    out, info = normalise(image, mask, "tissue-peaks", tissue=tissue)
    assert info["wm_peak"] > info["gm_peak"]  # T1
    assert abs(np.median(out[mask & (tissue["WM"] >= 0.9)]) - 1.0) < 1e-3
    assert abs(np.median(out[mask & (tissue["GM"] >= 0.6)])) < 1e-3
    inverted, _ = normalise(-image, mask, "tissue-peaks", tissue=tissue)  # a T2-like contrast keeps its sign
    assert np.median(inverted[mask & (tissue["WM"] >= 0.9)]) == pytest.approx(-1.0, abs=1e-3)


def test_histogram_maps_landmarks_onto_the_reference(scan):
    image, mask, _ = scan
    ref = _reference(scan)
    out, _ = normalise(np.abs(image) ** 1.15, mask, "histogram", ref)
    assert np.allclose(histogram_landmarks(out, mask) * 100, ref, atol=0.5)


def test_missing_reference_or_tissue_is_an_error(scan):
    image, mask, _ = scan
    with pytest.raises(ValueError, match="reference"):
        normalise(image, mask, "histogram")
    with pytest.raises(ValueError, match="WM and GM maps"):
        normalise(image, mask, "tissue-peaks")

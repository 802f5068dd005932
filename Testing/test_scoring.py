"""Scorers, normalisation, post-processing and calibration on data with known answers."""

import numpy as np
import pytest
import SimpleITK as sitk

from BrainAnomalyLib.calibration import choose_threshold, thresholds_for_fpr
from BrainAnomalyLib.detection.postprocess import (PostprocessConfig, clip_to_mask, erode_mask, filter_map,
                                                   label_lesions, scan_score, slab_voxels)
from BrainAnomalyLib.preprocess.normalise import normalise
from BrainAnomalyLib.core.progress import CancelToken, Reporter
from BrainAnomalyLib.core.errors import Cancelled
from BrainAnomalyLib.scorers import direction_for
from BrainAnomalyLib.scorers.intensity import IntensityScorer
from BrainAnomalyLib.scorers.normative import NormativeScorer


def _blob_volume():
    rng = np.random.default_rng(0)
    image = rng.normal(0.0, 0.3, (30, 40, 40)).astype(np.float32)
    mask = np.zeros(image.shape, bool)
    mask[3:27, 4:36, 4:36] = True
    image[12:16, 18:22, 18:22] -= 4.0  # a dark lesion
    return image, mask


@pytest.mark.parametrize("method", ["median-iqr", "percentile"])
def test_normalisation_ignores_global_scale_and_offset(method):
    image, mask = _blob_volume()
    a, _ = normalise(image * 100 + 500, mask, method)
    b, _ = normalise(image * 3.5 - 20, mask, method)
    assert np.allclose(a, b, atol=1e-4)


def test_directions_by_modality():
    assert (direction_for("T1"), direction_for("FLAIR"), direction_for("T2")) == ("hypo", "hyper", "hyper")


@pytest.mark.parametrize("direction,lesion_high", [("hypo", True), ("hyper", False), ("two-sided", True)])
def test_intensity_scorer_direction(direction, lesion_high):
    image, mask = _blob_volume()
    out = IntensityScorer({"direction": direction}, {}).score(image, mask, Reporter()).anomaly_map
    lesion = out[12:16, 18:22, 18:22].mean()
    assert (lesion > 5) == lesion_high
    assert out[~mask].max() == 0


def test_normative_fit_recovers_mean_and_spread():
    rng = np.random.default_rng(1)
    shape = (10, 12, 14)
    mean = rng.normal(0, 1, shape)
    mask = np.ones(shape, bool)
    samples = [(mean + 0.5 * rng.standard_normal(shape), mask) for _ in range(400)]
    params, t = NormativeScorer.fit(iter(samples), {"direction": "two-sided"}, Reporter())
    assert params["n_scans"] == 400
    assert np.abs(t["mean"] - mean).max() < 0.15
    assert abs(float(np.median(t["std"])) - 0.5) < 0.05
    scorer = NormativeScorer(params, t)
    z = scorer.score(mean + 2.0, mask, Reporter()).anomaly_map
    assert 3.0 < np.median(z) < 5.0  # 2 / 0.5 = 4 standard deviations


def test_normative_support_excludes_voxels_rarely_inside_the_brain():
    shape = (6, 6, 6)
    full = np.ones(shape, bool)
    partial = full.copy()
    partial[0] = False
    samples = [(np.zeros(shape), partial if i < 5 else full) for i in range(10)]
    _, t = NormativeScorer.fit(iter(samples), {"direction": "hyper"}, Reporter())
    assert t["support"][0].sum() == 0 and t["support"][1:].all()


def test_fit_needs_two_scans():
    with pytest.raises(ValueError, match="at least two"):
        NormativeScorer.fit(iter([(np.zeros((3, 3, 3)), np.ones((3, 3, 3), bool))]), {}, Reporter())


def test_cleaning_erodes_filters_and_clips():
    image, mask = _blob_volume()
    raw = IntensityScorer({"direction": "two-sided"}, {}).score(image, mask, Reporter()).anomaly_map
    post = PostprocessConfig(erode_voxels=2, median_size=3)
    eroded = erode_mask(mask, post)
    cleaned = clip_to_mask(filter_map(raw - 1.0, post), eroded)
    assert eroded.sum() < mask.sum() and cleaned[~eroded].max() == 0 and cleaned.min() == 0
    assert cleaned[13, 19, 19] > 5  # the lesion survives a 3x3 median


@pytest.mark.parametrize("shape", [(80, 40, 36), (7, 30, 30), (1, 20, 20)])
def test_the_median_filter_in_two_halves_is_scipys(shape):
    from scipy import ndimage

    volume = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    for size in (3, 5):
        assert np.array_equal(filter_map(volume, PostprocessConfig(median_size=size)),
                              ndimage.median_filter(volume, size=(1, size, size)))


def test_thick_slices_erode_the_mask_across_slices_only():
    mask = np.zeros((20, 30, 30), bool)
    mask[4:16, 5:25, 5:25] = True
    post = PostprocessConfig(erode_voxels=0)
    # 1 mm scans, 2 mm scans and 2 mm obliques (extent up to 2.83 mm) on the 2 mm grid keep their mask.
    for extent in ([1.0, 1.0, 1.0], [2.4, 2.0, 2.0], [2.83, 2.83, 2.0], None):
        assert slab_voxels(extent, (2.0, 2.0, 2.0)) == (0, 0, 0)
    assert slab_voxels([8.3, 1.0, 1.0], (2.0, 2.0, 2.0)) == (3, 0, 0)
    assert slab_voxels([5.2, 0.9, 0.9], (2.0, 2.0, 2.0)) == (1, 0, 0)
    eroded = erode_mask(mask, post, slab_voxels([8.3, 1.0, 1.0], (2.0, 2.0, 2.0)))
    z, y, x = np.nonzero(eroded)
    assert (z.min(), z.max()) == (7, 12)  # three slices off the top and the bottom
    assert (y.min(), y.max(), x.min(), x.max()) == (5, 24, 5, 24)  # in-plane untouched


def test_label_lesions_sizes_centroids_and_minimum_size():
    arr = np.zeros((20, 30, 40), np.float32)
    arr[5:9, 10:14, 10:14] = 5.0  # 64 voxels
    arr[15, 25, 35] = 9.0  # one voxel: below the minimum size
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((2.0, 1.0, 0.5))
    img.SetOrigin((10.0, -20.0, 30.0))
    mask, lesions = label_lesions(img, 1.0, min_lesion_ml=0.01)
    assert len(lesions) == 1
    les = lesions[0]
    assert les["voxels"] == 64 and les["volume_ml"] == pytest.approx(64 * 1e-3)
    assert les["centroid_ijk"] == [11.5, 11.5, 6.5]
    lps = (10.0 + 11.5 * 2.0, -20.0 + 11.5 * 1.0, 30.0 + 6.5 * 0.5)
    assert les["centroid_ras"] == [pytest.approx(-lps[0]), pytest.approx(-lps[1]), pytest.approx(lps[2])]
    assert les["mean_score"] == 5.0 and les["max_score"] == 5.0
    assert sitk.GetArrayFromImage(mask).sum() == 64
    _, none = label_lesions(img, 100.0, 0.0)
    assert none == []


def test_scan_score_is_mean_of_top_percent():
    values = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    assert scan_score(values, np.ones_like(values, bool)) == pytest.approx(np.mean(np.arange(990, 1000)))
    assert scan_score(values, np.zeros_like(values, bool)) == 0.0


def test_thresholds_for_fpr_hand_computed():
    values = [np.arange(0, 5000, dtype=np.float32), np.arange(5000, 10000, dtype=np.float32)]
    t = thresholds_for_fpr(values, (0.01, 0.1))
    assert t["0.01"] == pytest.approx(9899.01, abs=0.01) and t["0.1"] == pytest.approx(8999.1, abs=0.01)
    pooled = np.concatenate(values)
    assert (pooled > t["0.01"]).mean() == pytest.approx(0.01, abs=1e-4)


def test_choose_threshold_precedence_and_interpolation():
    meta = {"calibration": {"thresholds": {"0.001": 6.0, "0.01": 4.0, "0.05": 3.0}, "n_scans": 20}}
    assert choose_threshold(meta).value == 4.0 and choose_threshold(meta).fpr == 0.01
    assert choose_threshold(meta, threshold=7.5).to_dict() == {"value": 7.5, "fpr": None, "source": "user value"}
    mid = choose_threshold(meta, fpr=np.sqrt(0.001 * 0.01)).value  # half-way in log-FPR
    assert mid == pytest.approx(5.0)
    assert choose_threshold({"default_threshold": 2.5}).source.startswith("model default")
    with pytest.raises(ValueError, match="no calibration"):
        choose_threshold({}, fpr=0.01)


def test_cancel_token_stops_the_reporter():
    token = CancelToken()
    rep = Reporter(cancel=token)
    rep("step", 0.5)
    token.cancel()
    with pytest.raises(Cancelled):
        rep("step", 0.6)


def test_label_lesions_statistics_match_scipy_per_label_definitions():
    """The fast per-component statistics equal ndimage's own (which sort the whole volume and are slow)."""
    from scipy import ndimage

    rng = np.random.default_rng(4)
    arr = ndimage.gaussian_filter(rng.standard_normal((30, 40, 50)), 1.5).astype(np.float32) * 5
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.5, 1.0, 2.0))
    numbered, lesions = label_lesions(img, 0.8, 0.0, numbered=True)
    labels = sitk.GetArrayFromImage(numbered)
    assert len(lesions) > 5 and labels.max() == len(lesions)
    for les in lesions:
        component = labels == les["label"]
        assert les["voxels"] == int(component.sum())
        assert les["max_score"] == pytest.approx(float(arr[component].max()), abs=1e-4)
        assert les["mean_score"] == pytest.approx(float(arr[component].mean()), abs=1e-4)
        k, j, i = ndimage.center_of_mass(component)
        assert les["centroid_ijk"] == pytest.approx([i, j, k], abs=0.01)
    assert [les["max_score"] for les in lesions] == sorted((les["max_score"] for les in lesions), reverse=True)

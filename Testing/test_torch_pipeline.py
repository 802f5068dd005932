"""The torch pre- and post-processing of the CUDA path against the SimpleITK/numpy/scipy of the CPU path, run here
on the CPU (the ops are device-agnostic): the same numbers within the stated bounds, and the same findings."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy import ndimage

from BrainAnomalyLib.core.progress import Reporter
from BrainAnomalyLib.detection import postprocess as cpu_post
from BrainAnomalyLib.detection import torch_postprocess as torch_post
from BrainAnomalyLib.preprocess import torch_grid
from BrainAnomalyLib.preprocess.normalise import TORCH_METHODS, normalise

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _oblique_pair():
    """A smooth volume on an oblique, anisotropic grid, a grid elsewhere in space and an affine between them."""
    rng = np.random.default_rng(0)
    arr = (ndimage.gaussian_filter(rng.normal(size=(30, 40, 36)), 2) * 1000).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.1, 0.9, 1.3))
    img.SetOrigin((-20.0, -15.0, -10.0))
    img.SetDirection(sitk.VersorTransform((0.1, 0.2, 0.3), 0.3).GetMatrix())
    ref = sitk.Image([20, 25, 18], sitk.sitkFloat32)
    ref.SetSpacing((1.5, 1.5, 1.5))
    ref.SetOrigin((-14.0, -16.0, -8.0))
    t = sitk.AffineTransform(3)
    t.SetMatrix([1.05, 0.05, 0, -0.03, 0.97, 0.02, 0, 0.01, 1.02])
    t.SetTranslation((1.5, -2.0, 0.7))
    t.SetCenter((2.0, 1.0, 0.0))
    return img, ref, t


def test_resampling_onto_the_grid_matches_simpleitk():
    img, ref, t = _oblique_pair()
    mask = sitk.GetArrayFromImage(img) > 0
    expected = sitk.GetArrayFromImage(sitk.Resample(img, ref, t, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    mask_img = sitk.GetImageFromArray(mask.astype(np.uint8))
    mask_img.CopyInformation(img)
    expected_mask = sitk.GetArrayFromImage(sitk.Resample(mask_img, ref, t, sitk.sitkNearestNeighbor, 0,
                                                         sitk.sitkUInt8)).astype(bool)
    raw, grid_mask = torch_grid.onto_grid(img, mask, t, ref, "cpu")
    # The part of the grid outside the scan (0 in both) is part of the check: the grid reaches beyond it.
    assert 0 < (expected == 0).sum() < expected.size
    assert np.abs(raw - expected).max() <= 1e-4 * np.abs(expected).max()
    assert np.corrcoef(raw.ravel(), expected.ravel())[0, 1] >= 0.9999
    assert np.array_equal(raw == 0, expected == 0)
    assert (grid_mask != expected_mask).sum() <= 0.001 * grid_mask.size


def test_back_projection_matches_simpleitk():
    img, ref, t = _oblique_pair()
    rng = np.random.default_rng(1)
    grid_map = ndimage.gaussian_filter(rng.normal(size=(18, 25, 20)), 1.5).astype(np.float32)
    src = sitk.GetImageFromArray(grid_map)
    src.CopyInformation(ref)
    for nearest, interp in ((False, sitk.sitkLinear), (True, sitk.sitkNearestNeighbor)):
        expected = sitk.GetArrayFromImage(sitk.Resample(src, img, t.GetInverse(), interp, 0.0, sitk.sitkFloat32))
        got = torch_grid.back_to_native(grid_map, ref, t, img, nearest, "cpu")
        assert got.GetSize() == img.GetSize() and got.GetDirection() == img.GetDirection()
        got = sitk.GetArrayFromImage(got)
        assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] >= 0.999
        assert (np.abs(got - expected) > 1e-4).mean() <= 0.001


@pytest.mark.parametrize("method", TORCH_METHODS)
def test_standardisation_matches_numpy(method):
    rng = np.random.default_rng(2)
    vol = (rng.gamma(4.0, 100.0, size=(20, 24, 22)) + 50).astype(np.float32)
    mask = np.zeros(vol.shape, bool)
    mask[3:17, 4:20, 5:19] = True
    tissue = {"WM": rng.uniform(size=vol.shape), "GM": rng.uniform(size=vol.shape)}
    expected, info = normalise(vol, mask, method, None, tissue)
    got, got_info = torch_grid.normalise_array(vol, mask, method, tissue, "cpu")
    assert got.dtype == np.float32
    assert np.abs(got - expected).max() <= 1e-5 * max(1.0, np.abs(expected).max())
    assert got_info.keys() == info.keys()
    assert all(np.isclose(got_info[k], info[k], rtol=1e-9) for k in info if k != "method")


def test_histogram_standardisation_is_left_to_numpy():
    with pytest.raises(ValueError, match="no torch version"):
        torch_grid.normalise(torch.ones(4, 4, 4), torch.ones(4, 4, 4, dtype=torch.bool), "histogram")


@pytest.mark.parametrize("median_size,erode,slab", [(5, 3, (0, 0, 0)), (4, 1, (0, 0, 0)), (1, 0, (0, 0, 0)),
                                                     (5, 0, (3, 0, 0)), (3, 1, (1, 2, 1))])
def test_map_cleaning_matches_scipy(median_size, erode, slab):
    rng = np.random.default_rng(3)
    raw = rng.normal(size=(16, 30, 26)).astype(np.float32)
    mask = np.zeros(raw.shape, bool)
    mask[1:15, 3:28, 2:24] = True
    mask[6, 10, 10] = False  # a hole the erosion has to grow
    config = cpu_post.PostprocessConfig(median_size=median_size, erode_voxels=erode)
    filtered, eroded = cpu_post.filter_map(raw, config), cpu_post.erode_mask(mask, config, slab)
    clean, got_eroded, stats = torch_post.postprocess(raw, mask, config, "cpu", slab)
    assert np.array_equal(got_eroded, eroded)
    assert (erode == 0 and not any(slab)) or eroded.sum() < mask.sum()
    assert np.array_equal(clean, cpu_post.clip_to_mask(filtered, eroded))
    expected = cpu_post.robust_stats(filtered[eroded])
    assert stats == pytest.approx(expected, rel=1e-6)  # numpy takes the middle pair's mean in float32


def test_small_lesion_channel_matches_numpy():
    rng = np.random.default_rng(4)
    raw = rng.normal(size=(16, 30, 26)).astype(np.float32)
    mask = np.ones(raw.shape, bool)
    zone = np.zeros(raw.shape, bool)
    zone[4:12, 8:20, 6:18] = True
    config = cpu_post.PostprocessConfig(median_size=5, erode_voxels=0)
    expected = cpu_post.clip_to_mask(cpu_post.small_lesions(cpu_post.filter_map(raw, config), raw, zone), mask)
    clean, _, _ = torch_post.postprocess(raw, mask, config, "cpu", (0, 0, 0), zone)
    assert np.array_equal(clean, expected)
    assert not np.array_equal(clean, torch_post.postprocess(raw, mask, config, "cpu")[0])


@pytest.mark.parametrize("acquisition", [None, (8.0, 2.0, 1.0)])
def test_small_lesion_margin_matches_numpy(acquisition):
    from BrainAnomalyLib.core.template import Grid

    rng = np.random.default_rng(5)
    raw = rng.normal(size=(16, 30, 26)).astype(np.float32)
    mask = np.ones(raw.shape, bool)
    zone = np.zeros(raw.shape, bool)
    zone[4:12, 8:20, 6:18] = True
    config = cpu_post.PostprocessConfig(median_size=5, erode_voxels=0, small_lesion_spread=1.5)
    filtered = cpu_post.filter_map(raw, config)
    margin = cpu_post.small_lesion_margin(filtered, raw, config, acquisition, Grid())
    expected = cpu_post.clip_to_mask(cpu_post.small_lesions(filtered, raw, zone, margin), mask)
    clean, _, _ = torch_post.postprocess(raw, mask, config, "cpu", (0, 0, 0), zone, acquisition, Grid())
    np.testing.assert_allclose(clean, expected, rtol=0, atol=1e-6)
    plain, _, _ = torch_post.postprocess(raw, mask, cpu_post.PostprocessConfig(median_size=5, erode_voxels=0),
                                         "cpu", (0, 0, 0), zone)
    assert (clean <= plain + 1e-6).all() and (clean < plain - 1e-3).any()


def test_detection_on_the_torch_path_gives_the_same_findings(coarse_demo_case, template_normative_model):
    """The brats-like demo case (an oblique, moved head with one lesion, at 3 mm: its registration, the same on
    both paths, is most of the time) through detection on both paths: the registration is the same (seeded
    SimpleITK), everything around the scoring differs."""
    from BrainAnomalyLib.detection.pipeline import Detector
    from BrainAnomalyLib.preprocess.chain import PreprocessConfig

    scan, truth = coarse_demo_case
    results = []
    for torch_ops in (None, "cpu"):
        # N4 is the same code on both paths and the slowest step here: left out to keep the test short.
        detector = Detector(template_normative_model, device="cpu",
                            preprocess_config=PreprocessConfig(bias_correction=False))
        detector.torch_ops = torch_ops
        results.append(detector.run(scan, modality="T1", reporter=Reporter()))
    cpu, gpu_path = results
    assert next(s for s in gpu_path.preprocessing if s["step"] == "resample")["device"] == "cpu"
    a = sitk.GetArrayFromImage(cpu.anomaly_map).ravel()
    b = sitk.GetArrayFromImage(gpu_path.anomaly_map).ravel()
    assert np.corrcoef(a, b)[0, 1] >= 0.999
    assert cpu.lesions and len(gpu_path.lesions) == len(cpu.lesions)
    for x, y in zip(cpu.lesions, gpu_path.lesions):
        assert abs(x["voxels"] - y["voxels"]) <= 0.02 * x["voxels"]
        assert np.linalg.norm(np.subtract(x["centroid_ras"], y["centroid_ras"])) < 1.0
    assert gpu_path.pred_score == pytest.approx(cpu.pred_score, rel=1e-3)
    assert gpu_path.threshold["value"] == pytest.approx(cpu.threshold["value"], rel=1e-3)


def test_torch_registration_recovers_a_known_affine():
    """The template moved by a known affine (rotation, scaling, shift) and registered back on a coarse grid: the
    brain lands where the true transform puts it (Dice >= 0.98, the issue's bound against SimpleITK)."""
    from BrainAnomalyLib.core.template import brain_mask_on_grid, template_on_grid
    from BrainAnomalyLib.preprocess.torch_register import as_sitk_affine, register_affine_torch

    from conftest import small_grid

    grid = small_grid()
    fixed, fixed_mask = template_on_grid(grid), brain_mask_on_grid(grid)
    truth = sitk.AffineTransform(3)
    rotation = np.reshape(sitk.VersorTransform((0.2, -0.1, 1.0), 0.12).GetMatrix(), (3, 3))
    truth.SetMatrix((rotation @ np.diag([1.05, 0.95, 1.0])).ravel().tolist())
    truth.SetTranslation((6.0, -8.0, 4.0))
    # The scan: the template seen through the inverse (scan point = truth(template point)), on a 3 mm grid.
    scan_grid = sitk.Image([64, 72, 60], sitk.sitkFloat32)
    scan_grid.SetSpacing((3.0, 3.0, 3.0))
    scan_grid.SetOrigin((-95.0, -90.0, -80.0))
    moving = sitk.Resample(template_on_grid(), scan_grid, truth.GetInverse(), sitk.sitkLinear, 0.0,
                           sitk.sitkFloat32)
    moving_mask = sitk.GetArrayFromImage(moving) > 0.1
    matrix, info = register_affine_torch(moving, moving_mask, fixed, fixed_mask, "cpu")
    assert info["ncc_per_level"][-1] > 0.8

    def on_grid(transform):
        m = sitk.GetImageFromArray(moving_mask.astype(np.uint8))
        m.CopyInformation(moving)
        return sitk.GetArrayFromImage(sitk.Resample(m, fixed, transform, sitk.sitkNearestNeighbor, 0)) > 0

    a, b = on_grid(truth), on_grid(as_sitk_affine(matrix))
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) >= 0.98
    start = sitk.AffineTransform(3)  # the plain start is clearly worse, so the bound is not met by doing nothing
    start.SetTranslation(truth.GetTranslation())
    c = on_grid(start)
    assert 2 * (a & c).sum() / (a.sum() + c.sum()) < 0.95


def test_a_request_chooses_the_registration():
    from BrainAnomalyLib.core.errors import BadInputError
    from BrainAnomalyLib.detection.request import DetectionRequest

    model_meta = {"preprocessing": {"registration": "affine"}}
    chosen = DetectionRequest.from_dict({"input": "scan.nii.gz", "registration_method": "torch"})
    assert chosen.preprocess_config(model_meta).registration == "torch"
    kept = DetectionRequest.from_dict({"input": "scan.nii.gz"})
    assert kept.preprocess_config(model_meta).registration == "affine"
    with pytest.raises(BadInputError, match="unknown registration 'elastix'"):
        DetectionRequest.from_dict({"input": "scan.nii.gz", "registration_method": "elastix"})

"""Outputs land on the input's own grid, exactly, whatever its orientation, spacing and origin."""

import numpy as np
import SimpleITK as sitk

from BrainAnomalyLib.core.io import same_geometry
from BrainAnomalyLib.preprocess.chain import Preprocessed, to_native
from BrainAnomalyLib.core.template import Grid


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1)


def test_outputs_share_the_oblique_input_geometry(demo_case, demo_result):
    scan, _ = demo_case
    assert not np.allclose(np.array(scan.GetDirection()).reshape(3, 3), np.eye(3), atol=0.05)  # really oblique
    assert len(set(scan.GetSpacing())) == 3 and any(abs(o) > 1 for o in scan.GetOrigin())
    for image in (demo_result.anomaly_map, demo_result.pred_mask, demo_result.brain_mask,
                  demo_result.reconstruction):
        assert same_geometry(image, scan)


def test_lesion_in_the_input_lands_on_the_same_voxels(demo_case, demo_result):
    _, truth = demo_case
    truth = sitk.GetArrayFromImage(truth) > 0
    pred = sitk.GetArrayFromImage(demo_result.pred_mask) > 0
    assert _dice(pred, truth) > 0.6
    # The largest reported lesion is the inserted one: its centroid is within a few mm of the truth's.
    top = demo_result.lesions[0]
    idx = np.argwhere(truth).mean(axis=0)[::-1]
    true_lps = np.array(demo_result.pred_mask.TransformContinuousIndexToPhysicalPoint(idx.tolist()))
    true_ras = true_lps * np.array([-1, -1, 1])
    assert np.linalg.norm(np.array(top["centroid_ras"]) - true_ras) < 4.0
    assert abs(top["volume_ml"] - truth.sum() * np.prod(demo_case[0].GetSpacing()) / 1000) < 2.0


def test_back_projection_is_exact_for_a_known_transform():
    """A marker placed on the model grid lands on the native voxels the transform says it should."""
    grid = Grid()
    native = sitk.Image([70, 90, 60], sitk.sitkFloat32)
    native.SetSpacing([2.5, 1.8, 3.0])
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    native.SetDirection(rot.ravel().tolist())
    native.SetOrigin([-80.0, -70.0, -60.0])
    # template point q maps to native point T(q): a rotation + translation
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(rot.T.ravel().tolist())
    transform.SetTranslation([5.0, -3.0, 2.0])
    marker = np.zeros(tuple(reversed(grid.size)), np.float32)
    marker[40:44, 50:54, 45:49] = 1.0  # (z, y, x)
    pre = Preprocessed(marker, marker > 0, np.ones(1, bool), transform, grid)
    out = sitk.GetArrayFromImage(to_native(marker, pre, native, nearest=True))
    assert same_geometry(to_native(marker, pre, native), native)
    centre_idx = [46.5, 51.5, 41.5]  # x, y, z of the marker's centre on the grid
    q = np.array(grid.reference().TransformContinuousIndexToPhysicalPoint(centre_idx))
    expected = np.array(native.TransformPhysicalPointToContinuousIndex(transform.TransformPoint(q.tolist())))
    got = np.argwhere(out > 0.5).mean(axis=0)[::-1]
    assert np.abs(got - expected).max() < 1.0


def test_reconstruction_is_on_the_scan_intensity_scale(demo_case, demo_result):
    scan, truth = demo_case
    brain = (sitk.GetArrayFromImage(demo_result.brain_mask) > 0) & ~(sitk.GetArrayFromImage(truth) > 0)
    recon = sitk.GetArrayFromImage(demo_result.reconstruction)[brain]
    original = sitk.GetArrayFromImage(scan)[brain]
    # healthy tissue: the pseudo-healthy image agrees with the scan in level and spread (the scan is 0..1000)
    assert abs(np.median(recon) - np.median(original)) < 0.1 * np.median(original)
    assert np.corrcoef(recon, original)[0, 1] > 0.8

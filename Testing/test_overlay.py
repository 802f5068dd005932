"""The PNG montage: what it shows and where (real SimpleITK volumes, read back with Pillow)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from BrainAnomalyLib.detection.overlay import (CAPTION, COLS, PRED_RGB, TILE_WIDTH, TITLE, TRUTH_RGB, hot,
                                              overlay_montage)


def _volume(array: np.ndarray, spacing=(1.0, 1.0, 1.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    return image


def _case(spacing=(1.0, 1.0, 1.0)):
    z, y, x = np.mgrid[:40, :60, :50]
    brain = ((z - 20) / 16.0) ** 2 + ((y - 30) / 25.0) ** 2 + ((x - 25) / 20.0) ** 2 <= 1
    scan = np.where(brain, 100.0 + 10 * np.sin(x / 3.0), 0.0).astype(np.float32)
    lesion = ((z - 20) ** 2 + (y - 30) ** 2 + (x - 30) ** 2) <= 36
    heat = np.where(lesion, 5.0, 0.0).astype(np.float32)
    volumes = [_volume(a, spacing) for a in (scan, heat, lesion.astype(np.uint8), brain.astype(np.uint8))]
    return volumes, lesion


def test_montage_shows_heat_findings_and_truth(tmp_path):
    (scan, heat, pred, brain), lesion = _case()
    truth = _volume(np.roll(lesion, 4, axis=2).astype(np.uint8))
    path = overlay_montage(scan, heat, pred, 1.0, tmp_path / "overlay.png", brain, title="a title", truth=truth)
    rgb = np.asarray(Image.open(path).convert("RGB"))
    assert rgb.shape[1] == COLS * TILE_WIDTH and rgb.shape[0] > TILE_WIDTH
    colours = {tuple(c) for c in rgb.reshape(-1, 3)}
    assert PRED_RGB in colours and TRUTH_RGB in colours
    # the heat above threshold, in 'hot' over grey: red clearly ahead of blue somewhere
    assert ((rgb[..., 0].astype(int) - rgb[..., 2]) > 120).sum() > 100
    # and nothing but grey where there is no heat: a map of zeros leaves every tile grey (and the text white)
    empty = _volume(np.zeros(lesion.shape, np.float32))
    plain = np.asarray(Image.open(overlay_montage(scan, empty, _volume(np.zeros(lesion.shape, np.uint8)), 1.0,
                                                  tmp_path / "plain.png", brain)).convert("RGB")).astype(int)
    assert np.abs(plain[..., 0] - plain[..., 2]).max() <= 2


def test_montage_keeps_the_in_plane_aspect(tmp_path):
    (scan, heat, pred, brain), _ = _case()
    square = np.asarray(Image.open(overlay_montage(scan, heat, pred, 1.0, tmp_path / "a.png", brain)))
    (scan, heat, pred, brain), _ = _case(spacing=(1.0, 2.0, 1.0))  # rows twice as far apart
    tall = np.asarray(Image.open(overlay_montage(scan, heat, pred, 1.0, tmp_path / "b.png", brain)))
    def tile_height(montage):  # 12 slices: two rows of six
        return (montage.shape[0] - TITLE) / 2 - CAPTION

    assert tile_height(tall) / tile_height(square) == pytest.approx(2.0, rel=0.02)


def test_hot_runs_black_red_yellow_white():
    np.testing.assert_allclose(hot(np.array([0.0, 0.365, 0.746, 1.0])),
                               [[0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]], atol=1e-3)

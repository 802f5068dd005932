"""postprocess.small_lesions: a lesion narrower than the median filter survives in deep white matter, and nowhere
else; off unless the model asks for it."""

import numpy as np
import pytest
from scipy import ndimage

from BrainAnomalyLib.core.template import Grid, brain_mask_on_grid, tissue_on_grid
from BrainAnomalyLib.detection.pipeline import Detector
from BrainAnomalyLib.detection.postprocess import (SMALL_LESION_DEPTH_MM, PostprocessConfig, filter_map,
                                                   slab_dilution, small_lesion_margin, small_lesion_zone,
                                                   small_lesions)
from BrainAnomalyLib.store.models import resolve_model
from BrainAnomalyLib.synth.appearance import healthy_template_scan

GRID = Grid()


def _blob(shape, centre):
    out = np.zeros(shape, bool)
    z, y, x = centre
    out[z, y:y + 2, x:x + 2] = True  # 4 mm across on the 2 mm grid: less than half the 5x5 median's window
    return out


def _cases():
    mask = brain_mask_on_grid(GRID)
    wm = tissue_on_grid(GRID)["WM"]
    depth = ndimage.distance_transform_edt(mask, sampling=2.0)
    deep = np.argwhere(mask & (wm > 0.95) & (depth > 20))
    edge = np.argwhere(mask & (depth <= 2.0) & (depth > 0))
    return mask, _blob(mask.shape, deep[len(deep) // 2]), _blob(mask.shape, edge[len(edge) // 2])


@pytest.mark.parametrize("wm", [0.5, 0.8])
def test_a_small_lesion_survives_in_deep_white_matter_only(wm):
    mask, deep, edge = _cases()
    raw = np.where(deep | edge, 3.0, 0.0).astype(np.float32)
    config = PostprocessConfig(median_size=5, small_lesion_wm=wm)
    filtered = filter_map(raw, config)
    assert filtered[deep].max() == 0 and filtered[edge].max() == 0  # what the median filter alone leaves
    zone = small_lesion_zone(mask, config, GRID)
    out = small_lesions(filtered, raw, zone)
    assert np.all(out[deep] == 3.0)
    assert out[edge].max() == 0
    assert np.array_equal(out[~zone], filtered[~zone])


def test_the_margin_spares_a_lone_lesion_and_damps_textured_white_matter():
    mask, deep, _ = _cases()
    zone = small_lesion_zone(mask, PostprocessConfig(small_lesion_wm=0.8), GRID)
    rng = np.random.default_rng(0)
    quiet = rng.normal(0.0, 0.05, mask.shape)
    textured = rng.normal(0.0, 1.0, mask.shape)  # a band of bright tissue, as busy as the lesion is bright
    half = np.zeros(mask.shape, bool)
    half[:, :, : mask.shape[2] // 2] = True
    lone = np.argwhere(deep)[0]
    on_quiet_side = half[tuple(lone)]
    raw = np.where(half == on_quiet_side, quiet, textured)
    raw = np.where(deep, 3.0, raw).astype(np.float32)
    config = PostprocessConfig(median_size=5, small_lesion_wm=0.8, small_lesion_spread=1.5)
    filtered = filter_map(raw, config)
    margin = small_lesion_margin(filtered, raw, config, None, GRID)
    out = small_lesions(filtered, raw, zone, margin)
    plain = small_lesions(filtered, raw, zone)
    assert out[deep].min() > 2.5  # a lone lesion loses little of its 3
    busy = zone & (half != on_quiet_side)
    assert np.mean(out[busy] > 1.0) < 0.5 * np.mean(plain[busy] > 1.0)
    assert small_lesion_margin(filtered, raw, PostprocessConfig(small_lesion_wm=0.8), None, GRID) is None


def test_thick_slices_shrink_the_margin_as_they_dilute_a_lesion():
    assert slab_dilution(None, (2.0, 2.0, 2.0)) == 1.0
    assert slab_dilution((1.0, 1.2, 0.9), (2.0, 2.0, 2.0)) == 1.0
    assert slab_dilution((8.0, 1.0, 1.0), (2.0, 2.0, 2.0)) == 0.25
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(12, 20, 20)).astype(np.float32)
    config = PostprocessConfig(median_size=5, small_lesion_spread=1.5)
    filtered = filter_map(raw, config)
    fine = small_lesion_margin(filtered, raw, config, (1.0, 1.0, 1.0), GRID)
    thick = small_lesion_margin(filtered, raw, config, (8.0, 1.0, 1.0), GRID)
    np.testing.assert_allclose(thick, 0.25 * fine, rtol=1e-5)


def test_the_zone_is_empty_when_off_and_keeps_off_the_brain_edge():
    mask = brain_mask_on_grid(GRID)
    assert not small_lesion_zone(mask, PostprocessConfig(), GRID).any()
    zone = small_lesion_zone(mask, PostprocessConfig(small_lesion_wm=0.5), GRID)
    assert zone.any()
    depth = ndimage.distance_transform_edt(mask, sampling=2.0)
    assert depth[zone].min() > SMALL_LESION_DEPTH_MM
    assert tissue_on_grid(GRID)["WM"][zone].min() > 0.5


def test_the_zone_refuses_a_mask_of_another_grid():
    with pytest.raises(ValueError, match="grid"):
        small_lesion_zone(np.ones((4, 4, 4), bool), PostprocessConfig(small_lesion_wm=0.5), GRID)


def test_the_shipped_flair_model_keeps_a_small_white_matter_lesion():
    image, mask = healthy_template_scan("FLAIR", seed=3, grid=GRID)
    wm = tissue_on_grid(GRID)["WM"]
    depth = ndimage.distance_transform_edt(mask, sampling=2.0)
    deep = np.argwhere(mask & (wm > 0.95) & (depth > 20))
    lesion = _blob(mask.shape, deep[len(deep) // 3])
    gm_level = float(np.median(image[mask & (tissue_on_grid(GRID)["GM"] > 0.6)]))
    image = np.where(lesion, 1.5 * gm_level, image).astype(np.float32)  # a lesion well above cortex on FLAIR
    model = resolve_model("tissue-flair")
    shipped = Detector(model, device="cpu")
    assert shipped.postprocess_config.small_lesion_wm > 0
    without = Detector(model, device="cpu",
                       postprocess_config=PostprocessConfig(**dict(model.meta["postprocess"], small_lesion_wm=0.0)))
    kept = shipped.score_grid(image, mask).clean_map[lesion]
    erased = without.score_grid(image, mask).clean_map[lesion]
    assert erased.max() == 0
    assert kept.min() > 1.0

"""postprocess.small_lesions: a lesion narrower than the median filter survives in deep white matter, and nowhere
else; off unless the model asks for it."""

import numpy as np
import pytest
from scipy import ndimage

from BrainAnomalyLib.core.template import Grid, brain_mask_on_grid, tissue_on_grid
from BrainAnomalyLib.detection.pipeline import Detector
from BrainAnomalyLib.detection.postprocess import (SMALL_LESION_DEPTH_MM, PostprocessConfig, filter_map,
                                                   small_lesion_zone, small_lesions)
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

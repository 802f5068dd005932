"""The contralateral step: a model's map minus a share of its mirror image across the template midline."""

from __future__ import annotations

import pytest

from BrainAnomalyLib.core.errors import ModelError
from BrainAnomalyLib.core.template import Grid, midline_axis
from BrainAnomalyLib.detection.pipeline import Detector
from BrainAnomalyLib.detection.postprocess import PostprocessConfig
from BrainAnomalyLib.preprocess.chain import PreprocessConfig
from BrainAnomalyLib.store.models import load_model, save_model
from BrainAnomalyLib.training.run import base_meta

from conftest import template_cohort


def _intensity_model(folder, grid=Grid(), contralateral=0.75):
    meta = base_meta("intensity", "mirror-intensity", "T1", "test model", grid, PreprocessConfig(),
                     PostprocessConfig(median_size=1, erode_voxels=0, contralateral=contralateral),
                     {"direction": "hypo"})
    meta["default_threshold"] = 2.0
    return load_model(save_model(folder, meta))


def test_the_template_grid_mirrors_along_its_last_axis():
    assert midline_axis(Grid()) == 2
    with pytest.raises(ValueError, match="not symmetric"):
        midline_axis(Grid(centre=(4.0, 17.0, 5.0)))


def test_a_one_sided_lesion_keeps_its_score_and_a_mirrored_pair_loses_most_of_it(tmp_path):
    image, mask = next(template_cohort(1, seed=3))
    image = image.copy()
    nx = image.shape[2]
    one_sided = (slice(40, 44), slice(50, 54), slice(30, 34))  # left of the midline only
    pair = (slice(30, 34), slice(40, 44))
    image[one_sided] -= 3.0
    image[pair + (slice(28, 32),)] -= 3.0
    image[pair + (slice(nx - 32, nx - 28),)] -= 3.0  # its mirror twin
    assert mask[one_sided].all() and mask[pair + (slice(28, 32),)].all()

    plain = Detector(_intensity_model(tmp_path / "plain", contralateral=0.0), device="cpu").score_grid(image, mask)
    mirror = Detector(_intensity_model(tmp_path / "mirror"), device="cpu").score_grid(image, mask)
    lesion = plain.clean_map[one_sided].mean()
    twin = plain.clean_map[pair + (slice(28, 32),)].mean()
    assert lesion > 2 and twin > 2
    # The one-sided lesion loses only a share of healthy tissue's score; the pair keeps 1 - 0.75 of its own.
    assert mirror.clean_map[one_sided].mean() > 0.8 * lesion
    assert mirror.clean_map[pair + (slice(28, 32),)].mean() < 0.4 * twin


def test_a_model_on_a_grid_off_the_midline_is_refused(tmp_path):
    model = _intensity_model(tmp_path / "off", grid=Grid(centre=(6.0, 17.0, 5.0)))
    with pytest.raises(ModelError, match="not symmetric"):
        Detector(model, device="cpu")

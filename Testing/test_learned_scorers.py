"""Learned scorers end to end on small data (half-resolution grid volumes): fit through the engine, write a model
folder, load it back and score through the detection path, with identical maps after the reload."""

from __future__ import annotations

import numpy as np
import pytest

from BrainAnomalyLib.store.models import load_model, save_model
from BrainAnomalyLib.detection.pipeline import Detector
from BrainAnomalyLib.detection.postprocess import PostprocessConfig
from BrainAnomalyLib.preprocess.chain import PreprocessConfig
from BrainAnomalyLib.core.progress import Reporter
from BrainAnomalyLib.scorers import scorer_class
from BrainAnomalyLib.training.run import base_meta
from BrainAnomalyLib.core.template import Grid
from conftest import small_template_cohort

pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Slices of 64 x 48: the half-resolution volumes padded to a size the nets' four stride-2 levels divide.
SIZE = [64, 48]
TINY = {"dae": {"features": [4, 4, 8, 8, 8, 4], "size": SIZE},
        "dpa": {"size": SIZE, "ae": {"type": "ae_dense", "channels": [4, 8, 8, 8], "latent": 8},
                "feature_net": {"type": "feature_net", "channels": [4, 8, 8, 8]}}}
GRID = Grid(size=(48, 64, 40), spacing=(4.0, 4.0, 4.0))


def cohort(n, seed):
    """conftest.small_template_cohort volumes, (40, 64, 48): the edge rows repeated 4 times front and back."""
    for image, mask in small_template_cohort(n, seed):
        yield np.pad(image, ((0, 0), (4, 4), (0, 0)), mode="edge"), np.pad(mask, ((0, 0), (4, 4), (0, 0)))


@pytest.mark.parametrize("kind", sorted(TINY))
def test_fit_save_load_score(kind, tmp_path):
    options = {"epochs": 2, "steps_per_epoch": 2, "batch_size": 8, "device": "cpu", "seed": 3, "arch": TINY[kind],
               "checkpoint_dir": str(tmp_path / "ckpt"), "report_dir": str(tmp_path / "report")}
    cls = scorer_class(kind)
    params, tensors = cls.fit(cohort(2, seed=1), {"direction": "hypo"}, Reporter(),
                              validation=cohort(1, seed=2), options=options)
    assert params["arch"]["type"] == kind and params["training"]["history"]["net"]["epochs_run"] == 2
    assert all(k.startswith("net.") for k in tensors) and tensors
    assert (tmp_path / "report" / "net" / "loss_curves.png").is_file()
    meta = base_meta(kind, f"tiny-{kind}", "T1", "test", GRID, PreprocessConfig(), PostprocessConfig(), params)
    model = load_model(save_model(tmp_path / "model", meta, tensors))
    image, mask = next(cohort(1, seed=5))
    first = Detector(model, device="cpu").score_grid(image, mask)
    again = Detector(load_model(tmp_path / "model"), device="cpu").score_grid(image, mask)
    assert first.raw_map.shape == image.shape and np.isfinite(first.raw_map).all()
    assert np.array_equal(first.raw_map, again.raw_map)
    assert not first.raw_map[~mask].any()
    assert first.reconstruction is not None and first.reconstruction.shape == image.shape
    expected = "perceptual" if kind == "dpa" else "signed"
    assert model.meta["params"]["score"] == expected


def test_batch_size_does_not_change_the_map(tmp_path):
    options = {"epochs": 1, "steps_per_epoch": 1, "batch_size": 4, "device": "cpu", "arch": TINY["dae"]}
    params, tensors = scorer_class("dae").fit(cohort(1, seed=1), {"direction": "hypo"}, Reporter(),
                                              validation=cohort(1, seed=2), options=options)
    image, mask = next(cohort(1, seed=5))
    maps = [scorer_class("dae")(dict(params, batch_size=b), tensors).score(image, mask, Reporter()).anomaly_map
            for b in (1, 7, 80)]
    assert np.allclose(maps[0], maps[1], atol=1e-5) and np.allclose(maps[0], maps[2], atol=1e-5)


def test_resuming_a_two_stage_fit_keeps_the_first_stage_and_trains_the_second_on(tmp_path):
    base = {"steps_per_epoch": 2, "batch_size": 8, "device": "cpu", "seed": 3, "arch": TINY["dpa"],
            "checkpoint_dir": str(tmp_path / "ckpt")}
    cls = scorer_class("dpa")
    first_params, first = cls.fit(cohort(2, seed=1), {"direction": "hypo"}, Reporter(),
                                  validation=cohort(1, seed=2), options=dict(base, epochs=1))
    params, tensors = cls.fit(cohort(2, seed=1), {"direction": "hypo"}, Reporter(),
                              validation=cohort(1, seed=2), options=dict(base, epochs=2, resume=True))
    history = params["training"]["history"]
    assert history["feature_net"]["epochs_run"] == 1 and history["net"]["epochs_run"] == 2
    feature_keys = [k for k in first if ".feature_net." in k or k.startswith("net.feature_net.")]
    assert feature_keys and all(np.array_equal(first[k], tensors[k]) for k in feature_keys)
    assert len(history["net"]["val_loss"]) == 2  # the second stage went on (its best epoch's weights are kept)

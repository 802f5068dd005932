"""Ensembles of calibrated models: members on a common healthy scale, averaged; built, saved, loaded and run
like any model."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from BrainAnomalyLib.cli.main import main
from BrainAnomalyLib.store.models import Model, load_model
from BrainAnomalyLib.core.progress import Reporter
from BrainAnomalyLib.scorers import scorer_class
from BrainAnomalyLib.scorers.ensemble import build_ensemble
from conftest import template_cohort


def _two_sided(model):
    meta = copy.deepcopy(model.meta)
    meta["params"]["direction"] = "two-sided"
    meta["name"] = "two-sided"
    return Model(model.path, meta, model.tensors)


def test_ensemble_averages_members_on_their_healthy_scale(template_normative_model):
    a, b = template_normative_model, _two_sided(template_normative_model)
    params, tensors = build_ensemble([a, b], weights=[1.0, 3.0])
    image, mask = next(template_cohort(1, seed=9))
    got = scorer_class("ensemble")(params, tensors).score(image, mask, Reporter()).anomaly_map
    expected = np.zeros(image.shape)
    for model, w in ((a, 1.0), (b, 3.0)):
        raw = scorer_class(model.kind)(model.meta["params"], model.tensors).score(image, mask, Reporter())
        ref = model.meta["calibration"]["adaptive"]
        expected += w * (raw.anomaly_map - ref["median"]) / ref["mad"]
    expected = np.where(mask, expected / 4.0, 0.0)
    assert np.allclose(got, expected, atol=1e-4)
    assert not np.allclose(got, 0.0)


def test_ensemble_refuses_uncalibrated_or_mixed_members(template_normative_model, intensity_model):
    with pytest.raises(ValueError, match="at least two"):
        build_ensemble([template_normative_model])
    with pytest.raises(ValueError, match="calibrate it first"):
        build_ensemble([template_normative_model, intensity_model])
    flair = _two_sided(template_normative_model)
    flair.meta["modality"] = "FLAIR"
    with pytest.raises(ValueError, match="share a modality"):
        build_ensemble([template_normative_model, flair])


def test_ensemble_cli_writes_a_loadable_model(template_normative_model, tmp_path):
    out = tmp_path / "ens"
    code = main(["ensemble", "--model", str(template_normative_model.path), "--model",
                 str(template_normative_model.path), "-o", str(out)])
    assert code == 0
    model = load_model(out)
    assert model.kind == "ensemble" and len(model.meta["params"]["members"]) == 2
    assert set(model.tensors) == {f"m{i}.{k}" for i in range(2) for k in template_normative_model.tensors}
    assert main(["ensemble", "--model", str(template_normative_model.path), "-o", str(tmp_path / "x")]) == 2

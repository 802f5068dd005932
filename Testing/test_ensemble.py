"""Ensembles of calibrated models: members on a common healthy scale, averaged; built, saved, loaded and run like
any model. An ensemble names its installed members by id and folder sha256 instead of copying their weights, so a
member that is missing or has changed is refused when the ensemble is loaded."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from BrainAnomalyLib.cli.main import main
from BrainAnomalyLib.core.errors import ModelError
from BrainAnomalyLib.core.progress import Reporter
from BrainAnomalyLib.store.model_store import import_model
from BrainAnomalyLib.store.models import Model, folder_digest, load_model, save_model
from BrainAnomalyLib.scorers import scorer_class
from BrainAnomalyLib.store.ensembles import build_ensemble
from conftest import template_cohort


def _two_sided(model):
    meta = copy.deepcopy(model.meta)
    meta["params"]["direction"] = "two-sided"
    meta["name"] = "two-sided"
    return Model(model.path, meta, model.tensors)


@pytest.fixture
def installed(tmp_path, monkeypatch, template_normative_model):
    """Two small calibrated models installed in a user models folder of their own: 'hypo' and 'two-sided'."""
    udir = tmp_path / "user-models"
    monkeypatch.setenv("BRAINANOMALY_MODELS_DIR", str(udir))
    two = _two_sided(template_normative_model)
    for name, m in (("hypo", template_normative_model), ("two-sided", two)):
        save_model(udir / name, dict(m.meta, name=name), m.tensors)
    return udir


def _build(tmp_path, *extra):
    out = tmp_path / "ens"
    assert main(["ensemble", "--model", "hypo", "--model", "two-sided", *extra, "-o", str(out)]) == 0
    return out


def test_ensemble_averages_members_on_their_healthy_scale(installed, tmp_path):
    folder = _build(tmp_path, "--weight", "1", "--weight", "3")
    assert sorted(p.name for p in folder.iterdir()) == ["model.json"]  # no copies of the members' weights
    model = load_model(folder)
    assert [m["id"] for m in model.meta["params"]["members"]] == ["hypo", "two-sided"]
    assert [m.name for m in model.members] == ["hypo", "two-sided"]
    image, mask = next(template_cohort(1, seed=9))
    got = scorer_class("ensemble").for_model(model, model.meta["params"]).score(image, mask, Reporter()).anomaly_map
    expected = np.zeros(image.shape)
    for name, w in (("hypo", 1.0), ("two-sided", 3.0)):
        member = load_model(installed / name)
        raw = scorer_class(member.kind)(member.meta["params"], member.tensors).score(image, mask, Reporter())
        ref = member.meta["calibration"]["adaptive"]
        expected += w * (raw.anomaly_map - ref["median"]) / ref["mad"]
    expected = np.where(mask, expected / 4.0, 0.0)
    assert np.allclose(got, expected, atol=1e-4)
    assert not np.allclose(got, 0.0)


@pytest.mark.parametrize("power", [2.0, 3.0])
def test_rms_rule_mirrors_each_member_then_takes_the_power_mean_of_scan_scaled_maps(installed, tmp_path, power):
    folder = _build(tmp_path, "--weight", "1", "--weight", "3", "--rule", "rms", "--contralateral", "0.5",
                    "--power", str(power), "--version", "3.0.0")
    model = load_model(folder)
    assert model.meta["version"] == "3.0.0"
    assert model.meta["params"]["rule"] == "rms" and model.meta["params"]["contralateral"] == 0.5
    # p = 2 is the default and is not written, so ensembles built before the setting existed score as they did
    assert model.meta["params"].get("power") == (None if power == 2.0 else power)
    assert model.meta["postprocess"]["contralateral"] == 0.0  # the fused map is not mirrored a second time
    image, mask = next(template_cohort(1, seed=9))
    got = scorer_class("ensemble").for_model(model, model.meta["params"]).score(image, mask, Reporter()).anomaly_map
    total = np.zeros(image.shape)
    for name, w in (("hypo", 1.0), ("two-sided", 3.0)):
        member = load_model(installed / name)
        raw = scorer_class(member.kind)(member.meta["params"], member.tensors).score(image, mask, Reporter())
        mirrored = raw.anomaly_map - 0.5 * raw.anomaly_map[:, :, ::-1]
        med = np.median(mirrored[mask])
        z = (mirrored - med) / np.median(np.abs(mirrored[mask] - med))
        total += w * np.clip(z, 0, None) ** power
    expected = np.where(mask, (total / 4.0) ** (1.0 / power), 0.0)
    assert np.allclose(got, expected, atol=1e-4)
    assert got.min() >= 0 and got.max() > 1


def test_rms_knees_take_each_member_past_its_knee_before_the_power_mean(installed, tmp_path):
    folder = _build(tmp_path, "--weight", "1", "--weight", "3", "--rule", "rms", "--contralateral", "0.5",
                    "--power", "1.5", "--knee", "0", "--knee", "1.5")
    model = load_model(folder)
    assert model.meta["params"]["knees"] == [0.0, 1.5]
    image, mask = next(template_cohort(1, seed=9))
    got = scorer_class("ensemble").for_model(model, model.meta["params"]).score(image, mask, Reporter()).anomaly_map
    total = np.zeros(image.shape)
    for name, w, knee in (("hypo", 1.0, 0.0), ("two-sided", 3.0, 1.5)):
        member = load_model(installed / name)
        raw = scorer_class(member.kind)(member.meta["params"], member.tensors).score(image, mask, Reporter())
        mirrored = raw.anomaly_map - 0.5 * raw.anomaly_map[:, :, ::-1]
        med = np.median(mirrored[mask])
        z = (mirrored - med) / np.median(np.abs(mirrored[mask] - med))
        total += w * np.clip(z - knee, 0, None) ** 1.5
    expected = np.where(mask, (total / 4.0) ** (1.0 / 1.5), 0.0)
    assert np.allclose(got, expected, atol=1e-4)
    # the knee changed the map: without it the second member's weak responses would count
    unkneed = load_model(_build(tmp_path / "plain", "--weight", "1", "--weight", "3", "--rule", "rms",
                                "--contralateral", "0.5", "--power", "1.5"))
    assert "knees" not in unkneed.meta["params"]  # no knee is not written, so older ensembles score as they did
    plain = scorer_class("ensemble").for_model(unkneed, unkneed.meta["params"]).score(image, mask, Reporter())
    assert (got <= plain.anomaly_map + 1e-5).all() and not np.allclose(got, plain.anomaly_map, atol=1e-3)


@pytest.mark.parametrize("extra", [["--rule", "rms", "--knee", "-1", "--knee", "0"],
                                   ["--knee", "1", "--knee", "1"],
                                   ["--rule", "rms", "--knee", "1"]])
def test_a_negative_knee_a_knee_without_the_rms_rule_or_one_per_member_missing_is_refused(installed, tmp_path,
                                                                                         extra, capsys):
    assert main(["ensemble", "--model", "hypo", "--model", "two-sided", *extra, "-o", str(tmp_path / "ens")]) == 2
    assert "knee" in capsys.readouterr().err
    assert not (tmp_path / "ens").exists()


def test_a_saved_ensemble_with_bad_knees_is_refused_when_scored(installed, tmp_path):
    model = load_model(_build(tmp_path, "--rule", "rms"))
    for knees in ([1.0], [0.0, float("nan")]):
        with pytest.raises(ValueError, match="knee"):
            scorer_class("ensemble").for_model(model, dict(model.meta["params"], knees=knees))


@pytest.mark.parametrize("extra", [["--rule", "rms", "--power", "0.5"], ["--power", "3"]])
def test_a_power_below_1_or_without_the_rms_rule_is_refused(installed, tmp_path, extra, capsys):
    assert main(["ensemble", "--model", "hypo", "--model", "two-sided", *extra, "-o", str(tmp_path / "ens")]) == 2
    assert "power" in capsys.readouterr().err
    assert not (tmp_path / "ens").exists()


def test_a_missing_member_is_a_model_error_naming_it(installed, tmp_path):
    folder = _build(tmp_path)
    (installed / "two-sided" / "model.safetensors").unlink()
    (installed / "two-sided" / "model.json").unlink()
    (installed / "two-sided").rmdir()
    with pytest.raises(ModelError, match="member 'two-sided' is not installed"):
        load_model(folder)
    # The CLI turns it into exit 3 before reading any input.
    assert main(["detect", str(tmp_path / "no-scan.nii.gz"), "-o", str(tmp_path / "out"),
                 "--model", str(folder)]) == 3
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("what", ["tensors", "calibration"])
def test_a_changed_member_is_a_model_error_naming_it(installed, tmp_path, what):
    folder = _build(tmp_path)
    member = installed / "hypo"
    if what == "tensors":  # same size, one byte different: a corrupted or tampered file
        data = bytearray((member / "model.safetensors").read_bytes())
        data[-1] ^= 0xFF
        (member / "model.safetensors").write_bytes(bytes(data))
    else:  # recalibrated since: the scale the ensemble recorded no longer belongs to this member
        meta = json.loads((member / "model.json").read_text(encoding="utf-8"))
        meta["calibration"]["adaptive"]["mad"] *= 2
        (member / "model.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(ModelError, match="member 'hypo' .* does not match the sha256 the ensemble recorded"):
        load_model(folder)


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["members"][0].pop("sha256"), "member 1 is not named by id and sha256"),  # the old, copied form
    (lambda p: p["members"][1]["scale"].update(mad=0.0), "member 'two-sided' has no healthy scale"),
    (lambda p: p.update(weights=[1.0]), "weights are not 2 non-negative numbers"),
    (lambda p: p.update(members=p["members"][:1]), "at least two members"),
])
def test_a_malformed_ensemble_is_a_model_error(installed, tmp_path, edit, message):
    folder = _build(tmp_path)
    meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    edit(meta["params"])
    (folder / "model.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(ModelError, match=message):
        load_model(folder)


def test_ensemble_refuses_uncalibrated_or_mixed_members(template_normative_model, intensity_model):
    with pytest.raises(ValueError, match="at least two"):
        build_ensemble([template_normative_model])
    with pytest.raises(ValueError, match="calibrate it first"):
        build_ensemble([template_normative_model, intensity_model])
    flair = _two_sided(template_normative_model)
    flair.meta["modality"] = "FLAIR"
    with pytest.raises(ValueError, match="share a modality"):
        build_ensemble([template_normative_model, flair])


def test_ensemble_cli_refuses_members_that_are_not_installed(installed, tmp_path, template_normative_model,
                                                              capsys):
    out = tmp_path / "x"
    assert main(["ensemble", "--model", "hypo", "--model", str(template_normative_model.path), "-o", str(out)]) == 2
    assert "is not installed" in capsys.readouterr().err and not out.exists()
    assert main(["ensemble", "--model", "hypo", "-o", str(out)]) == 2 and not out.exists()
    # A folder that is a copy of an installed model is named by that model's id.
    params = build_ensemble([load_model(installed / "two-sided"), load_model(tmp_path / "user-models" / "hypo")])
    assert [m["id"] for m in params["members"]] == ["two-sided", "hypo"]
    assert params["members"][1]["sha256"] == folder_digest(installed / "hypo")


def test_importing_an_ensemble_needs_its_members(installed, tmp_path):
    folder = _build(tmp_path)
    target = import_model(folder)
    assert target == installed / "ens" and len(load_model(target).members) == 2
    (installed / "two-sided" / "model.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ModelError, match="cannot import .*member 'two-sided'"):
        import_model(folder, overwrite=True)


def test_within_one_scan_a_member_scored_on_its_own_is_not_scored_again_by_the_ensemble(installed, tmp_path):
    from BrainAnomalyLib.detection.pipeline import Detector
    from BrainAnomalyLib.scorers.reuse import shared_scores

    ensemble = Detector(load_model(_build(tmp_path, "--rule", "rms", "--contralateral", "0.5")), device="cpu")
    member = Detector(load_model(installed / "hypo"), device="cpu")
    image, mask = next(template_cohort(1, seed=9))
    alone = [d.score_grid(image, mask) for d in (member, ensemble)]
    with shared_scores() as shared:
        together = [d.score_grid(image, mask) for d in (member, ensemble)]
        # 'hypo' was handed back to the ensemble; 'two-sided' was scored once, by it
        assert len(shared.outputs) == 2 and shared.reused_seconds > 0
    for a, b in zip(alone, together):
        assert np.array_equal(a.clean_map, b.clean_map) and np.array_equal(a.raw_map, b.raw_map)
    with pytest.raises(ValueError):
        together[0].raw_map[0, 0, 0] = 1.0  # a shared map is read-only
    assert alone[0].raw_map.flags.writeable  # outside the scope nothing is shared or frozen

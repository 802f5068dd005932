"""Model folders: safetensors + JSON, checksums, registry, user folder."""

import json
import shutil

import numpy as np
import pytest

from BrainAnomalyLib.core.errors import ModelError
from BrainAnomalyLib.core.files import folder_digest
from BrainAnomalyLib.store.models import (list_models, load_model, resolve_model, save_model,
                                          shipped_entries, shipped_registry_file)


def test_round_trip_keeps_tensors_exactly(tmp_path):
    t = {"mean": np.random.rand(4, 5, 6).astype(np.float32), "support": np.ones((4, 5, 6), np.uint8)}
    folder = save_model(tmp_path / "m", {"kind": "normative", "modality": "T1", "grid": {}}, t)
    m = load_model(folder)
    assert set(m.tensors) == {"mean", "support"}
    assert np.array_equal(m.tensors["mean"], t["mean"]) and m.tensors["support"].dtype == np.uint8
    assert json.loads((folder / "model.json").read_text(encoding="utf-8"))["files"]["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging folder left behind


def test_half_precision_storage_is_read_back_as_float32_and_kept_on_resave(tmp_path):
    t = {"net.w": np.random.rand(20, 30, 40).astype(np.float32), "net.steps": np.arange(3, dtype=np.int64)}
    full = save_model(tmp_path / "full", {"kind": "normative", "modality": "T1", "grid": {}}, t)
    half = save_model(tmp_path / "half", {"kind": "normative", "modality": "T1", "grid": {}}, t, half=True)
    assert (half / "model.safetensors").stat().st_size < 0.6 * (full / "model.safetensors").stat().st_size
    m = load_model(half)
    assert m.meta["storage_dtype"] == "float16" and m.tensors["net.w"].dtype == np.float32
    assert np.array_equal(m.tensors["net.w"], t["net.w"].astype(np.float16).astype(np.float32))
    assert not np.array_equal(m.tensors["net.w"], t["net.w"])
    assert m.tensors["net.steps"].dtype == np.int64 and np.array_equal(m.tensors["net.steps"], t["net.steps"])
    # Re-saving (e.g. after calibrating) keeps the half-precision file byte for byte.
    again = save_model(tmp_path / "again", dict(m.meta, calibration={}), m.tensors)
    assert (again / "model.safetensors").read_bytes() == (half / "model.safetensors").read_bytes()
    assert "storage_dtype" not in load_model(save_model(tmp_path / "f", m.meta, m.tensors, half=False)).meta


def test_missing_and_broken_folders_are_refused(tmp_path):
    with pytest.raises(ModelError, match="not a model folder"):
        load_model(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    with pytest.raises(ModelError, match="unreadable"):
        load_model(tmp_path)


def test_unknown_kind_and_missing_tensors_are_refused(tmp_path):
    save_model(tmp_path / "a", {"kind": "magic", "modality": "T1", "grid": {}})
    with pytest.raises(ModelError, match="unknown scorer kind"):
        load_model(tmp_path / "a")
    save_model(tmp_path / "b", {"kind": "normative", "modality": "T1", "grid": {}})
    with pytest.raises(ModelError, match="needs model.safetensors"):
        load_model(tmp_path / "b")


def test_deleted_tensor_file_is_reported(tmp_path):
    folder = save_model(tmp_path / "m", {"kind": "normative", "modality": "T1", "grid": {}},
                        {"mean": np.zeros(3, np.float32)})
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="missing file model.safetensors"):
        load_model(folder)


def test_registry_digest_catches_changed_metadata(tmp_path, template_normative_model):
    folder = tmp_path / "m"
    shutil.copytree(template_normative_model.path, folder)
    digest = folder_digest(folder)
    load_model(folder, expected_digest=digest)
    meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    meta["calibration"]["thresholds"]["0.01"] = 0.0
    (folder / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="registry checksum"):
        load_model(folder, expected_digest=digest)


def test_every_shipped_model_loads_and_matches_the_registry():
    entries = shipped_entries()
    assert entries, f"no models listed in {shipped_registry_file()}"
    for e in entries:
        m = resolve_model(e["id"])
        assert m.kind == e["kind"] and m.modality == e["modality"]
        assert e["size_bytes"] <= 25 * 2 ** 20
        # Calibrated on healthy scans, or (no healthy cohort of that contrast here) saying so, with a default.
        if "calibration" not in m.meta:
            assert "UNCALIBRATED" in e["description"] and "default_threshold" in m.meta, \
                f"{e['id']} is neither calibrated nor labelled as uncalibrated"


def test_user_folder_models_are_listed_and_resolved(tmp_path, monkeypatch, intensity_model):
    monkeypatch.setenv("BRAINANOMALY_MODELS_DIR", str(tmp_path))
    shutil.copytree(intensity_model.path, tmp_path / "mine")
    assert any(r["id"] == "mine" and r["source"] == "user" for r in list_models())
    assert resolve_model("mine").kind == "intensity"



def test_register_model_half_keeps_the_card_and_training_report(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parent.parent / "scripts" / "register_model.py"
    spec = importlib.util.spec_from_file_location("register_model", script)
    register = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(register)
    t = {"net.w": np.random.rand(30, 40).astype(np.float32)}
    folder = save_model(tmp_path / "m", {"kind": "normative", "modality": "T1", "grid": {}}, t)
    (folder / "MODEL_CARD.md").write_text("card")
    (folder / "training" / "net").mkdir(parents=True)
    (folder / "training" / "net" / "loss_curves.png").write_bytes(b"png")
    register.repack(folder, half=True)
    m = load_model(folder)
    assert m.meta["storage_dtype"] == "float16"
    assert np.array_equal(m.tensors["net.w"], t["net.w"].astype(np.float16).astype(np.float32))
    assert (folder / "MODEL_CARD.md").read_text() == "card"
    assert (folder / "training" / "net" / "loss_curves.png").read_bytes() == b"png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no staging folder left behind
    m = register.repack(folder, version="2.0.0")
    assert m.meta["version"] == "2.0.0" and m.meta["storage_dtype"] == "float16"
    assert np.array_equal(m.tensors["net.w"], t["net.w"].astype(np.float16).astype(np.float32))
    assert (folder / "training" / "net" / "loss_curves.png").read_bytes() == b"png"

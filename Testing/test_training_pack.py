"""Training from a training pack (the GPU-host path of scripts/gpu_train.sh) and resuming a model trained earlier,
on small data: real nets through the training engine, real model folders."""

from __future__ import annotations

import numpy as np
import pytest

from BrainAnomalyLib.core.errors import BadInputError
from BrainAnomalyLib.core.progress import Reporter
from BrainAnomalyLib.detection.pipeline import Detector
from BrainAnomalyLib.detection.postprocess import PostprocessConfig
from BrainAnomalyLib.preprocess.chain import PreprocessConfig
from BrainAnomalyLib.scorers import scorer_class
from BrainAnomalyLib.scorers.learned_fit import write_resume_checkpoints
from BrainAnomalyLib.store.models import load_model
from BrainAnomalyLib.store.training_pack import TrainingPack, write_pack
from BrainAnomalyLib.training.meta import settings_meta
from BrainAnomalyLib.training.packed import train_from_pack
from test_learned_scorers import GRID, TINY, cohort

pytest.importorskip("torch")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

RECORD = {"manifest": "tiny.csv", "n_train": 3, "n_calibration": 5, "n_test_held_out": 5, "lesion_rows_ignored": 0,
          "skipped": [], "other_modality_rows": 0, "test_subjects": []}


def _pack(path, n_fit=2, n_val=1):
    volumes = [(f"s{i}", "fit" if i < n_fit else "validation", image, mask)
               for i, (image, mask) in enumerate(cohort(n_fit + n_val, seed=1))]
    meta = {"modality": "T1", "settings": settings_meta(GRID, PreprocessConfig(), PostprocessConfig()),
            "training_data": RECORD}
    write_pack(path, iter(volumes), lambda: meta)
    return volumes


def test_a_pack_gives_back_its_volumes_by_part(tmp_path):
    volumes = _pack(tmp_path / "pack.npz")
    pack = TrainingPack(tmp_path / "pack.npz")
    assert pack.subjects == ["s0", "s1", "s2"] and pack.meta["training_data"] == RECORD
    back = list(pack.volumes("all"))
    for (_, _, image, mask), (image2, mask2) in zip(volumes, back):
        assert np.array_equal(mask, mask2) and image2.dtype == np.float32
        half_step = (image[mask].max() - image[mask].min()) / 255 / 2
        error = np.abs(image[mask] - image2[mask])
        assert error.max() <= half_step * 1.001 and error.mean() < half_step  # 8 bits inside the brain
        assert np.isclose(image2[mask].min(), image[mask].min(), atol=1e-6)  # the range itself kept
        assert np.array_equal(image[~mask], image2[~mask])  # the constant outside, exact
    assert len(list(pack.volumes("fit"))) == 2 and len(list(pack.volumes("validation"))) == 1


def test_a_pack_refuses_what_it_cannot_hold(tmp_path):
    image, mask = next(cohort(1, seed=1))
    image = image.copy()
    image[~mask] = np.arange((~mask).sum())  # not one constant outside the brain: would be lost
    with pytest.raises(ValueError, match="not constant outside"):
        write_pack(tmp_path / "bad.npz", iter([("s0", "fit", image, mask)]), dict)
    (tmp_path / "junk.npz").write_bytes(b"not a pack")
    with pytest.raises(BadInputError):
        TrainingPack(tmp_path / "junk.npz")


def test_training_from_a_pack_writes_a_model_that_scores(tmp_path):
    _pack(tmp_path / "pack.npz")
    options = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 8, "device": "cpu", "arch": TINY["dae"]}
    folder = train_from_pack("dae", tmp_path / "pack.npz", tmp_path / "dae", Reporter(), options=options, half=True)
    model = load_model(folder)
    assert model.meta["training_data"]["manifest"] == "tiny.csv"
    assert model.meta["training_data"]["training_pack"] == "pack.npz"
    assert "calibration" not in model.meta  # calibrated afterwards, where the manifest's scans are
    assert model.meta["params"]["residual_norm"]["method"] == "voxel"
    assert (folder / "training" / "net" / "loss_curves.png").is_file()
    image, mask = next(cohort(1, seed=5))
    assert np.isfinite(Detector(model, device="cpu").score_grid(image, mask).raw_map).all()
    with pytest.raises(BadInputError, match="learned scorers only"):
        train_from_pack("normative", tmp_path / "pack.npz", tmp_path / "n", Reporter())


def test_a_trained_model_resumes_where_its_history_ends(tmp_path):
    base = {"steps_per_epoch": 2, "batch_size": 8, "device": "cpu", "seed": 3, "arch": TINY["dpa"]}
    cls = scorer_class("dpa")
    params, tensors = cls.fit(cohort(2, seed=1), {"direction": "hypo"}, Reporter(), validation=cohort(1, seed=2),
                              options=dict(base, epochs=2))
    assert write_resume_checkpoints("dpa", params, tensors, tmp_path / "ckpt") == 2
    more, after = cls.fit(cohort(2, seed=1), {"direction": "hypo"}, Reporter(), validation=cohort(1, seed=2),
                          options=dict(base, epochs=3, resume=True, checkpoint_dir=str(tmp_path / "ckpt")))
    history, before = more["training"]["history"], params["training"]["history"]
    assert history["feature_net"]["epochs_run"] == 2 and history["net"]["epochs_run"] == 3
    assert history["net"]["val_loss"][:2] == before["net"]["val_loss"]  # the recorded epochs, carried on
    first = [k for k in tensors if k.startswith("net.feature_net.")]
    assert first and all(np.array_equal(tensors[k], after[k]) for k in first)  # first stage kept as trained
    with pytest.raises(ValueError, match="no recorded training history"):
        write_resume_checkpoints("dpa", {"arch": params["arch"]}, tensors, tmp_path / "none")

"""The training engine for learned scorers (BrainAnomalyLib/learn): slicing, augmentation, pickle-free checkpoints,
fit_net (loss goes down, exact resume, early stopping, time budget, cancel, two optimiser groups) and torchrun.

Networks here are tiny stand-ins that follow the slice-net protocol; Testing/learn_ddp_helper.py imports them."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from BrainAnomalyLib.core.errors import Cancelled, ModelError
from BrainAnomalyLib.learn import checkpoint as ckpt
from BrainAnomalyLib.learn.augment2d import Augment2DConfig, Augmenter2D
from BrainAnomalyLib.learn.engine import TrainConfig, fit_net
from BrainAnomalyLib.learn.slices import (SliceSet, slices_from_volume, slices_to_volume, split_by_subject,
                                          volume_slices_for_scoring)
from BrainAnomalyLib.core.progress import Reporter

ROOT = Path(__file__).resolve().parent.parent
NO_AUG = Augment2DConfig(enabled=False)


# ------------------------------------------------------------------------------------------------ test networks
class TinyAE(nn.Module):
    """conv-BN-conv autoencoder; input noise while training (global torch RNG). With `disc`, a one-layer
    discriminator whose weights "loss" also reaches (the engine must keep that gradient off them) and which learns
    from "d_loss" scaled by `d_scale`."""

    def __init__(self, channels: int = 1, disc: bool = False, d_scale: float = 1.0) -> None:
        super().__init__()
        self.init_args = {"channels": channels, "disc": disc, "d_scale": d_scale}
        self.arch = {"type": "tiny", **self.init_args}
        self.enc = nn.Conv2d(channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.dec = nn.Conv2d(4, channels, 3, padding=1)
        self.disc = nn.Conv2d(channels, 1, 3, padding=1) if disc else None
        self.d_scale = d_scale

    def forward(self, x):
        return self.dec(torch.relu(self.bn(self.enc(x))))

    def training_losses(self, x, mask):
        noisy = x + 0.05 * torch.randn_like(x) if self.training else x
        recon = self(noisy)
        m = mask.float()
        rec = ((recon - x).abs() * m).sum() / (m.sum() * x.shape[1]).clamp(min=1)
        out = {"loss": rec, "rec": rec.detach()}
        if self.disc is not None:
            adv = (self.disc(recon) - 1).pow(2).mean()
            out["loss"] = rec + 0.1 * adv
            out["d_loss"] = self.d_scale * ((self.disc(x) - 1).pow(2).mean() + self.disc(recon.detach()).pow(2).mean())
            out["adv"] = adv.detach()
        return out

    def param_groups(self):
        groups = {"main": [p for n, p in self.named_parameters() if not n.startswith("disc.")]}
        if self.disc is not None:
            groups["disc"] = list(self.disc.parameters())
        return groups

    @torch.no_grad()
    def reconstruct(self, x):
        return self(x)


class ScriptedNet(nn.Module):
    """One weight w pulled towards 10 in training; the validation loss (w - 2)^2 is lowest part way, so it first
    improves and then gets worse. `nan_after`: the training loss becomes NaN after that many calls."""

    def __init__(self, nan_after=None) -> None:
        super().__init__()
        self.arch = {"type": "scripted"}
        self.w = nn.Parameter(torch.zeros(()))
        self.nan_after = nan_after
        self.calls = 0

    def training_losses(self, x, mask):
        anchor = 0.0 * x.mean()
        if self.training:
            self.calls += 1
            bad = self.nan_after is not None and self.calls > self.nan_after
            return {"loss": (self.w - 10.0) ** 2 + anchor + (float("nan") if bad else 0.0)}
        return {"loss": (self.w - 2.0) ** 2 + anchor}

    def param_groups(self):
        return {"main": [self.w]}

    def reconstruct(self, x):
        return x.clone()


def tiny_slices(n: int = 48, seed: int = 0, h: int = 16, w: int = 12, channels: int = 1):
    """Brain-like slices: an elliptic mask, smooth structure plus noise inside, 0 outside."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    mask = ((yy - h / 2) / (0.4 * h)) ** 2 + ((xx - w / 2) / (0.4 * w)) ** 2 < 1
    x = np.stack([np.where(mask, 1.0 + 0.3 * np.sin(yy / 3.0 + k % 7) + 0.05 * rng.standard_normal(mask.shape), 0.0)
                  for k in range(n)]).astype(np.float32)[:, None]
    x = np.repeat(x, channels, axis=1)
    return x, np.repeat(mask[None, None], n, axis=0)


def weights_hash(state_dict) -> str:
    h = hashlib.sha256()
    for k in sorted(state_dict):
        h.update(k.encode())
        h.update(state_dict[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def data(n=48, seed=0):
    x, m = tiny_slices(n, seed)
    k = int(n * 0.75)
    return (x[:k], m[:k]), (x[k:], m[k:])


def new_net(**kw):
    torch.manual_seed(0)
    return TinyAE(**kw)


# ------------------------------------------------------------------------------------------------ slices
def test_slices_context_filter_and_round_trip():
    rng = np.random.default_rng(1)
    image = rng.standard_normal((7, 5, 4)).astype(np.float32)
    mask = np.zeros(image.shape, bool)
    mask[1:6, 1:4, 1:3] = True
    mask[3] = False  # an empty slice in the middle
    mask[5, 1, 1:3] = False  # 4 of 20 pixels: below the minimum
    x, m, z = slices_from_volume(image, mask, context=1, min_brain_fraction=0.25)
    fraction = mask.reshape(7, -1).mean(1)
    assert list(z) == [i for i in range(7) if fraction[i] >= 0.25] == [1, 2, 4]
    assert x.shape == (3, 3, 5, 4) and x.dtype == np.float32 and m.shape == (3, 1, 5, 4) and m.dtype == bool
    for row, zi in enumerate(z):
        for c, dz in enumerate((-1, 0, 1)):
            np.testing.assert_array_equal(x[row, c], image[min(max(zi + dz, 0), 6)])
        np.testing.assert_array_equal(m[row, 0], mask[zi])

    xs, ms = volume_slices_for_scoring(image, mask, context=2)
    assert xs.shape == (7, 5, 5, 4) and ms.shape == (7, 1, 5, 4)
    np.testing.assert_array_equal(xs[0, 0], image[0])  # edge replicated
    np.testing.assert_array_equal(xs[0, 1], image[0])
    np.testing.assert_array_equal(xs[6, 4], image[6])
    np.testing.assert_array_equal(slices_to_volume(xs[:, 2], image.shape), image)  # centre channel = the volume
    np.testing.assert_array_equal(slices_to_volume(xs[:, 2:3], image.shape), image)
    partial = slices_to_volume(x[:, 1], image.shape, z_indices=z, fill=-1.0)
    np.testing.assert_array_equal(partial[z], image[z])
    assert (partial[[0, 3, 5, 6]] == -1).all()
    with pytest.raises(ValueError):
        slices_to_volume(x[:, 1], image.shape)  # 3 maps, 7 slices, no z indices


def test_split_by_subject_stable_disjoint_and_sliceset():
    subjects = [f"sub-{i:02d}" for i in range(20)]
    train, val = split_by_subject(subjects, 0.25, seed=3)
    assert len(val) == 5 and set(train).isdisjoint(val) and set(train) | set(val) == set(subjects)
    shuffled = list(np.random.default_rng(0).permutation(subjects)) * 2  # order and repeats do not matter
    assert split_by_subject(shuffled, 0.25, seed=3) == (train, val)
    assert split_by_subject(subjects, 0.25, seed=4)[1] != val
    assert split_by_subject(["a", "b"], 0.1)[1] and split_by_subject(["a"], 0.5) == (["a"], [])

    rng = np.random.default_rng(0)
    volumes = []
    for i in range(4):
        image = rng.standard_normal((6, 4, 3)).astype(np.float32)
        mask = np.zeros(image.shape, bool)
        mask[1:5, 1:3, 1:] = True
        volumes.append((f"s{i}", image, mask))
    ss = SliceSet.from_volumes(volumes, context=1)
    assert len(ss) == 16 and ss.x.shape == (16, 3, 4, 3) and ss.subject_ids == ["s0", "s1", "s2", "s3"]
    tr, va = ss.split(0.5, seed=0)
    assert len(tr) + len(va) == 16 and set(tr.subject_ids).isdisjoint(va.subject_ids)
    for sub in va.subject_ids:
        image = dict((s, im) for s, im, _ in volumes)[sub]
        rows = va.subjects == sub
        np.testing.assert_array_equal(va.x[rows][:, 1], image[va.z[rows]])


# ------------------------------------------------------------------------------------------------ augmentation
def test_augmentation_seeded_background_and_alignment():
    x, m = tiny_slices(12, seed=2, h=24, w=20, channels=3)
    x[:, 1] += 1.0  # brain values well away from the background
    x[:, 1][~m[:, 0]] = 0.0
    config = Augment2DConfig(prob=1.0, rotate_deg=10.0)
    aug = Augmenter2D(config, seed=5)
    xa, ma = aug(x, m)
    assert xa.shape == x.shape and xa.dtype == np.float32 and ma.shape == m.shape and ma.dtype == bool
    centre = xa[:, 1]
    assert (centre[~ma[:, 0]] == 0).all()  # background exactly 0
    np.testing.assert_array_equal(centre != 0, ma[:, 0])  # the mask moved with the image
    assert not np.array_equal(ma, m) and not np.allclose(xa, x)
    xb, mb = Augmenter2D(config, seed=5)(x, m)
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ma, mb)
    aug.reseed(5)
    np.testing.assert_array_equal(aug(x, m)[0], xa)
    assert not np.array_equal(Augmenter2D(config, seed=6)(x, m)[0], xa)
    xt, mt = aug(torch.from_numpy(x), torch.from_numpy(m))  # tensors in, tensors out
    assert isinstance(xt, torch.Tensor) and mt.dtype == torch.bool
    off = Augmenter2D(Augment2DConfig(enabled=False))
    assert off(x, m)[0] is x


# ------------------------------------------------------------------------------------------------ checkpoints
def _stepped_once(net, opt, seed=0):
    x, m = tiny_slices(8, seed)
    losses = net.training_losses(torch.from_numpy(x), torch.from_numpy(m))
    for o in opt.values():
        o.zero_grad()
    (losses["loss"] + losses["d_loss"]).backward()
    for o in opt.values():
        o.step()


def _stepped(net, steps=3):
    opt = {"main": torch.optim.AdamW(net.param_groups()["main"], lr=1e-2),
           "disc": torch.optim.AdamW(net.param_groups()["disc"], lr=2e-3, betas=(0.5, 0.9))}
    for _ in range(steps):
        _stepped_once(net, opt)
    return opt


def test_checkpoint_round_trip_without_pickle(tmp_path, monkeypatch):
    net = new_net(disc=True)
    opts = _stepped(net)
    state = {"epoch": 3, "best_val": 0.25, "history": [{"epoch": 1, "train_loss": 1.5}], "bad_epochs": 1}

    def refuse(*a, **k):
        raise AssertionError("pickle used")

    for mod, name in ((pickle, "dump"), (pickle, "dumps"), (pickle, "load"), (pickle, "loads"),
                      (torch, "save"), (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)
    folder = ckpt.save_checkpoint(tmp_path / "ck", net, opts, state, {"best": net.state_dict()})
    expected_rng = torch.rand(3)

    torch.manual_seed(123)
    other = TinyAE(disc=True)
    other_opts = {"main": torch.optim.AdamW(other.param_groups()["main"], lr=0.5),
                  "disc": torch.optim.AdamW(other.param_groups()["disc"], lr=0.5)}
    loaded = ckpt.load_checkpoint(folder, other, other_opts, restore_rng=True)
    assert torch.equal(torch.rand(3), expected_rng)  # RNG as it was at the save
    monkeypatch.undo()

    assert loaded == state
    assert sorted(p.name for p in folder.iterdir()) == ["best.safetensors", "checkpoint.json", "net.safetensors",
                                                        "optimisers.safetensors", "rng.safetensors"]
    assert not list(tmp_path.glob(".ck-*"))
    x = torch.from_numpy(tiny_slices(4, 9)[0])
    net.eval(), other.eval()
    assert torch.equal(net(x), other(x)) and same_weights(net.state_dict(), other.state_dict())
    for name in opts:
        a, b = opts[name].state_dict(), other_opts[name].state_dict()
        assert a["param_groups"] == b["param_groups"]  # lr, betas (tuple again), eps, weight decay, ...
        assert a["state"].keys() == b["state"].keys()
        for idx in a["state"]:
            assert a["state"][idx].keys() == {"step", "exp_avg", "exp_avg_sq"} == b["state"][idx].keys()
            for key in a["state"][idx]:
                assert torch.equal(a["state"][idx][key], b["state"][idx][key])
    assert same_weights(ckpt.load_tensor_set(folder, "best"), net.state_dict())
    # Both go on training identically from here.
    for n, o in ((net, opts), (other, other_opts)):
        n.train()
        torch.manual_seed(7)
        _stepped_once(n, o)
    assert same_weights(net.state_dict(), other.state_dict())

    with pytest.raises(ModelError):
        ckpt.load_checkpoint(folder, TinyAE(disc=False))  # another network
    (folder / "net.safetensors").write_bytes((folder / "net.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ModelError, match="checksum"):
        ckpt.load_checkpoint(folder, other)


def test_checkpoint_swap_interrupted_keeps_previous(tmp_path, monkeypatch):
    from BrainAnomalyLib.core import files

    net = new_net()
    folder = ckpt.save_checkpoint(tmp_path / "ck", net, None, {"epoch": 1})
    real = os.replace
    calls = []

    def killed_after_first(src, dst):  # the old checkpoint moved aside, then nothing more happens
        calls.append(dst)
        if len(calls) >= 2:
            raise OSError("killed")
        return real(src, dst)

    monkeypatch.setattr(files.os, "replace", killed_after_first)
    with torch.no_grad():
        net.enc.weight.add_(1.0)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(folder, net, None, {"epoch": 2})
    monkeypatch.undo()
    assert len(calls) == 3  # the swap's second rename and its undo both failed
    assert not folder.exists() and ckpt.checkpoint_exists(folder)
    assert ckpt.load_checkpoint(folder, new_net()) == {"epoch": 1}
    ckpt.save_checkpoint(folder, net, None, {"epoch": 3})
    assert ckpt.load_checkpoint(folder, new_net()) == {"epoch": 3}
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # leftovers cleaned


# ------------------------------------------------------------------------------------------------ fit_net
def test_report_figures_are_palette_pngs_that_look_like_the_full_render():
    import io

    from matplotlib.figure import Figure
    from PIL import Image

    from BrainAnomalyLib.learn.report import png_bytes

    fig = Figure(figsize=(4, 2))
    grey, hot = fig.subplots(1, 2)
    rng = np.random.default_rng(0)
    grey.imshow(rng.random((64, 64)), cmap="gray")
    hot.imshow(rng.random((64, 64)), cmap="inferno")
    fig.suptitle("reconstruction")
    full = io.BytesIO()
    fig.savefig(full, dpi=100, format="png")
    small = png_bytes(fig)
    assert len(small) < 0.7 * len(full.getvalue())
    image = Image.open(io.BytesIO(small))
    assert image.mode == "P"
    diff = np.abs(np.asarray(image.convert("RGB"), np.int16) - np.asarray(Image.open(full).convert("RGB"), np.int16))
    assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 16


def test_training_reduces_loss_and_writes_report(tmp_path):
    train, val = data()
    seen = []
    config = TrainConfig(epochs=4, batch_size=8, lr=1e-2, device="cpu", patience=None,
                         augment=Augment2DConfig(prob=0.5), log_every=3)
    net = new_net()
    result = fit_net(net, train, val, config, Reporter(lambda s, f: seen.append((s, f))), checkpoint_dir=tmp_path)
    assert result["stop_reason"] == "epochs" and result["epochs_run"] == 4 and result["steps"] == 4 * 4
    assert result["train_loss"][-1] < 0.6 * result["train_loss"][0]
    assert result["val_loss"][-1] < 0.6 * result["val_loss"][0]
    assert all(e["val"]["rec"] == pytest.approx(e["val_loss"]) for e in result["history"])
    assert [f for _, f in seen] == sorted(f for _, f in seen) and seen[-1][1] == pytest.approx(1.0)
    assert any("epoch 2/4" in s and "loss" in s and "ETA" in s for s, _ in seen)
    for name in ("loss_curves.png", "reconstructions.png", "training.json"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "training.json").read_text())
    assert saved["val_loss"] == pytest.approx(result["val_loss"]) and saved["best_epoch"] == result["best_epoch"]
    best = ckpt.load_tensor_set(tmp_path / "checkpoint", "best")
    assert same_weights(best, net.state_dict())  # the net ends with the best validation weights


def test_resume_after_cancel_equals_uninterrupted(tmp_path):
    train, val = data()
    config = TrainConfig(epochs=4, batch_size=8, lr=1e-2, device="cpu", patience=None,
                         augment=Augment2DConfig(prob=0.5), log_every=2)
    whole = new_net()
    full = fit_net(whole, train, val, config, checkpoint_dir=tmp_path / "a", write_report=False)

    def cancel_in_epoch_3(step, fraction):
        if step.startswith("train epoch 3/4 step 2/"):
            raise Cancelled("test")

    cut = new_net()
    with pytest.raises(Cancelled):
        fit_net(cut, train, val, config, Reporter(cancel_in_epoch_3), checkpoint_dir=tmp_path / "b",
                write_report=False)
    # The last complete checkpoint (after epoch 2) is intact and loadable.
    probe = new_net()
    opts = {"main": torch.optim.AdamW(probe.parameters())}
    state = ckpt.load_checkpoint(tmp_path / "b" / "checkpoint", probe, opts)
    assert state["epoch"] == 2 and len(state["history"]) == 2 and state["stop_reason"] is None
    assert not same_weights(probe.state_dict(), cut.state_dict())  # the cut run had moved on in epoch 3

    resumed_net = new_net()
    resumed = fit_net(resumed_net, train, val, config, checkpoint_dir=tmp_path / "b", resume=True,
                      write_report=False)
    assert resumed["resumed_from_epoch"] == 2 and resumed["epochs_run"] == 4
    assert resumed["train_loss"] == full["train_loss"] and resumed["val_loss"] == full["val_loss"]
    assert same_weights(resumed_net.state_dict(), whole.state_dict())
    last_a = ckpt.load_checkpoint(tmp_path / "a" / "checkpoint", new_net())
    assert last_a["epoch"] == 4
    a, b = new_net(), new_net()
    ckpt.load_checkpoint(tmp_path / "a" / "checkpoint", a)
    ckpt.load_checkpoint(tmp_path / "b" / "checkpoint", b)
    assert same_weights(a.state_dict(), b.state_dict())  # last-epoch weights too
    # Resuming a finished run does no more training.
    again = fit_net(new_net(), train, val, config, checkpoint_dir=tmp_path / "b", resume=True, write_report=False)
    assert again["epochs_run"] == 4 and again["steps"] == resumed["steps"]


def test_worker_processes_give_the_same_run():
    train, val = data(32)
    config = TrainConfig(epochs=2, batch_size=8, lr=1e-2, device="cpu", augment=Augment2DConfig(prob=0.5), workers=0)
    nets = []
    for workers in (0, 2):
        nets.append(new_net())
        fit_net(nets[-1], train, val, TrainConfig(**dict(vars(config), workers=workers)))
    assert same_weights(nets[0].state_dict(), nets[1].state_dict())


def test_early_stopping_restores_best_weights(tmp_path):
    train, val = data(16)
    net = ScriptedNet()
    config = TrainConfig(epochs=40, batch_size=4, lr=0.5, weight_decay=0.0, device="cpu", patience=2,
                         steps_per_epoch=1, augment=NO_AUG)
    result = fit_net(net, train, val, config, checkpoint_dir=tmp_path, write_report=False)
    assert result["stop_reason"] == "early_stopping"
    assert result["epochs_run"] == result["best_epoch"] + 2 < 40
    vals = result["val_loss"]
    assert result["best_val_loss"] == min(vals) == vals[result["best_epoch"] - 1]
    assert vals[-1] > min(vals)
    assert float((net.w.detach() - 2.0) ** 2) == pytest.approx(result["best_val_loss"], abs=1e-6)
    last = ScriptedNet()
    ckpt.load_checkpoint(tmp_path / "checkpoint", last)
    assert float(last.w.detach()) > float(net.w.detach())  # training went past the best point; the net was put back


def test_time_budget_and_non_finite_loss_stop_cleanly():
    train, val = data(32)
    config = TrainConfig(epochs=50, batch_size=2, lr=0.1, device="cpu", max_minutes=1e-6, log_every=1,
                         augment=NO_AUG)
    result = fit_net(ScriptedNet(), train, val, config)
    assert result["stop_reason"] == "time" and result["epochs_run"] == 1
    assert result["history"][0]["partial"] and result["history"][0]["steps"] == 1
    assert result["best_epoch"] == 1 and result["val_loss"][0] is not None

    net = ScriptedNet(nan_after=10)
    config = TrainConfig(epochs=50, batch_size=4, lr=0.5, weight_decay=0.0, device="cpu", patience=None,
                         log_every=1, steps_per_epoch=3, augment=NO_AUG)
    result = fit_net(net, train, val, config)
    assert result["stop_reason"] == "non_finite_loss" and result["epochs_run"] == 4
    assert result["train_loss"][3] is None or not np.isfinite(result["train_loss"][3])
    w = float(net.w.detach())  # put back to the best finite weights
    assert np.isfinite(w) and (w - 2.0) ** 2 == pytest.approx(result["best_val_loss"], abs=1e-6)


@pytest.mark.parametrize("d_scale", [0.0, 1.0])
def test_two_optimiser_groups(tmp_path, d_scale):
    train, val = data(24)
    net = new_net(disc=True, d_scale=d_scale)
    start = {k: v.clone() for k, v in net.state_dict().items()}
    config = TrainConfig(epochs=2, batch_size=6, lr=1e-2, weight_decay=0.0, device="cpu", patience=None,
                         augment=NO_AUG)
    result = fit_net(net, train, val, config, checkpoint_dir=tmp_path, write_report=False)
    ck = tmp_path / "checkpoint"
    meta = ckpt.read_checkpoint_meta(ck)
    assert set(meta["optimisers"]) == {"main", "disc"}
    from safetensors.torch import load_file

    steps = {k: float(v) for k, v in load_file(str(ck / "optimisers.safetensors")).items() if k.endswith("/step")}
    assert steps and set(steps.values()) == {float(result["steps"])}  # both optimisers stepped every batch
    assert any(k.startswith("disc/") for k in steps) and any(k.startswith("main/") for k in steps)
    last = new_net(disc=True, d_scale=d_scale)
    ckpt.load_checkpoint(ck, last)
    assert not torch.equal(last.enc.weight, start["enc.weight"])
    disc_moved = not torch.equal(last.disc.weight, start["disc.weight"])
    # "loss" reaches the discriminator too, but only "d_loss" may move it: with d_loss = 0 it stays put.
    assert disc_moved == (d_scale > 0)
    assert "adv" in result["history"][0]["train"] and "d_loss" in result["history"][0]["val"]


def test_bad_inputs_are_refused():
    from BrainAnomalyLib.core.errors import BadInputError

    x, m = tiny_slices(8)
    with pytest.raises(BadInputError):
        fit_net(new_net(), (x, m[:, 0]), None, TrainConfig(epochs=1, device="cpu", augment=NO_AUG))
    with pytest.raises(BadInputError, match="monitor"):
        fit_net(new_net(), (x, m), (x, m), TrainConfig(epochs=1, device="cpu", augment=NO_AUG, monitor="nope"))


# ------------------------------------------------------------------------------------------------ torchrun
def test_torchrun_two_processes(tmp_path):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "Testing" / "learn_ddp_helper.py"), str(tmp_path)]
    # Its own process group, so a hang kills the workers too, not only torchrun (they would outlive the test).
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT),
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail("torchrun did not finish in 240 s:\n" + stdout[-2000:] + stderr[-2000:])
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    x, m = tiny_slices(56, seed=0)
    for name in ("ae", "gan"):
        ranks = [json.loads((tmp_path / f"rank{r}-{name}.json").read_text()) for r in (0, 1)]
        assert ranks[0] == ranks[1]  # same weights, same history, same decisions on both ranks
        info = ranks[0]
        assert info["world_size"] == 2 and info["stop_reason"] == "epochs"
        assert info["steps"] == [5, 5, 5]  # 40 training slices, batch 4 per rank, two ranks
        best = ckpt.load_tensor_set(tmp_path / name / "checkpoint", "best")
        assert weights_hash(best) == info["hash"]  # rank 0's checkpoint holds what every rank ended with
        assert (tmp_path / name / "training.json").is_file()
        # The validation loss is the mean over all validation slices, whichever rank saw them.
        net = TinyAE(disc=(name == "gan"))
        net.load_state_dict(best)
        net.eval()
        with torch.no_grad():
            loss = net.training_losses(torch.from_numpy(x[40:]), torch.from_numpy(m[40:]))["loss"]
        assert float(loss) == pytest.approx(info["best_val_loss"], rel=1e-5)
    assert not list(tmp_path.glob("rank*-*.json.tmp"))
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_a_checkpoint_from_before_a_new_hyperparameter_still_resumes(tmp_path):
    """An arch saved before a hyperparameter existed (here the autoencoders' noise_std/noise_res, whose defaults
    keep the old behaviour) matches the same net today; a really different arch is still refused."""
    import json

    from BrainAnomalyLib.core.errors import ModelError
    from BrainAnomalyLib.learn import checkpoint as ckpt
    from BrainAnomalyLib.nets import build_net

    arch = {"type": "ae_dense", "size": [32, 32], "channels": [4, 8], "strides": [2, 2], "latent": 8}
    net = build_net(arch)
    folder = ckpt.save_checkpoint(tmp_path / "ck", net, None, {"epoch": 1})
    meta_file = folder / ckpt.META_FILE
    meta = json.loads(meta_file.read_text())
    for key in ("noise_std", "noise_res"):
        del meta["arch"][key]
    meta_file.write_text(json.dumps(meta))
    same = build_net(arch)
    assert ckpt.load_checkpoint(folder, same)["epoch"] == 1
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), same.state_dict().values()))
    with pytest.raises(ModelError, match="arch differs"):
        ckpt.load_checkpoint(folder, build_net(dict(arch, noise_std=0.3)))
    with pytest.raises(ModelError, match="arch differs"):
        ckpt.load_checkpoint(folder, build_net(dict(arch, latent=4)))

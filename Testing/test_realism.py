"""Sampling diffusion models from noise (nets/diffusion.py `sample`) and the realism check (evaluation/realism.py,
realism_run.py): the Fréchet distance, the encoder's features and loading, the report, and its hook in training.
Tiny nets, CPU, one thread."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from BrainAnomalyLib.core.errors import ModelError  # noqa: E402
from BrainAnomalyLib.evaluation.realism import (Encoder, encoder_features, frechet_distance, load_encoder,  # noqa: E402
                                                realism_report)
from BrainAnomalyLib.training.realism_run import check_after_training  # noqa: E402
from BrainAnomalyLib.store.models import resolve_model, save_model  # noqa: E402
from BrainAnomalyLib.nets import build_net  # noqa: E402
from BrainAnomalyLib.detection.postprocess import PostprocessConfig  # noqa: E402
from BrainAnomalyLib.preprocess.chain import PreprocessConfig  # noqa: E402
from BrainAnomalyLib.core.progress import Reporter  # noqa: E402
from BrainAnomalyLib.core.template import Grid  # noqa: E402
from BrainAnomalyLib.training.run import base_meta, train  # noqa: E402
from test_diffusion import SIZE, brain_batch, ready, tiny  # noqa: E402
from test_training import _cohort  # noqa: E402
from conftest import small_grid  # noqa: E402

FEATURES = {"channels": [4, 8], "feature_layers": [0, 1], "norm_groups": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_encoder(size=SIZE, in_channels=1, modality="T1", seed=0):
    torch.manual_seed(seed)
    net = build_net({"type": "feature_net", "in_channels": in_channels, "size": list(size), **FEATURES})
    return Encoder(net.eval(), "tiny", modality)


def encoder_folder(folder, size, ready_flag=True):
    """A dpa model folder whose feature net is a tiny untrained one (what matters here is where it is stored)."""
    torch.manual_seed(1)
    ae = {"type": "ae_spatial", "channels": [4, 4], "strides": [2, 2], "latent_channels": 2}
    dpa = build_net({"type": "dpa", "size": list(size), "ae": ae, "feature_net": {"type": "feature_net", **FEATURES}})
    features = build_net(dpa.arch["feature_net"])
    if ready_flag:
        dpa.set_feature_net(features)
    tensors = {f"net.{k}": v.numpy() for k, v in dpa.state_dict().items()}
    meta = base_meta("dpa", folder.name, "T1", "test encoder", Grid(), PreprocessConfig(), PostprocessConfig(),
                     {"arch": dpa.arch, "direction": "hypo"})
    return save_model(folder, meta, tensors), features


# ----------------------------------------------------------------------------------------------- the distance
def test_fd_is_zero_against_itself_and_symmetric():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(size=(200, 6)) * 2 + 1
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-9)
    assert frechet_distance(a, b) > 1.0


def test_fd_of_a_shifted_or_scaled_copy_is_known():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 5)) @ rng.normal(size=(5, 5)) + 3.0
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0])
    # Equal covariances: the trace terms cancel and FD is the squared distance of the means.
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-6)
    # 2a: mean 2 mu and covariance 4 S, so FD = |mu|^2 + tr(S + 4S - 2 * 2S) = |mu|^2 + tr S.
    mu, cov = a.mean(axis=0), np.cov(a, rowvar=False)
    assert frechet_distance(a, 2 * a) == pytest.approx(float(mu @ mu + np.trace(cov)), rel=1e-5)


def test_fd_refuses_too_few_samples_and_bad_features():
    a = np.random.default_rng(2).normal(size=(10, 3))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a[:1], a)
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(a, a[:1])
    with pytest.raises(ValueError, match="dimensions"):
        frechet_distance(a, a[:, :2])
    with pytest.raises(ValueError, match="finite"):
        frechet_distance(np.where(a > 1, np.nan, a), a)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        frechet_distance(a.ravel(), a)


def test_fd_copes_with_fewer_samples_than_dimensions():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(5, 40))  # rank-deficient covariance
    a[:, 1] = a[:, 0]  # and two identical features
    b = rng.normal(size=(7, 40))
    fd = frechet_distance(a, b)
    assert np.isfinite(fd) and fd > 0
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(a, a + 1.0) == pytest.approx(40.0, rel=1e-4)


# ----------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("t,noise", [("ddpm", "gaussian"), ("ddpm", "simplex"), ("ldm", None)])
def test_sample_is_deterministic_shaped_and_batch_independent(t, noise):
    net = ready(build_net(tiny(t, **({"noise": noise} if noise else {}))))
    net.train()
    a = net.sample(5, torch.Generator().manual_seed(0), steps=3, batch=2)
    assert net.training  # the mode is restored
    assert a.shape == (5, 1, *SIZE) and a.dtype == torch.float32 and torch.isfinite(a).all()
    assert torch.equal(net.sample(5, torch.Generator().manual_seed(0), steps=3, batch=2), a)
    assert torch.allclose(net.sample(5, torch.Generator().manual_seed(0), steps=3, batch=5), a, atol=1e-5)
    assert torch.allclose(net.sample(3, torch.Generator().manual_seed(0), steps=3, batch=1), a[:3], atol=1e-5)
    assert not torch.allclose(net.sample(5, torch.Generator().manual_seed(1), steps=3, batch=2), a)
    assert not torch.allclose(a[0], a[1])  # every sample its own noise


def test_sample_starts_from_the_nets_own_noise_and_returns_standardised_units():
    seen = {}
    for noise in ("gaussian", "simplex"):
        net = build_net(tiny("ddpm", noise=noise, data_scale=0.25, clip=5.0))
        # (A forward hook that returns something replaces the output: this one returns None.)
        hook = net.unet.register_forward_hook(lambda mod, inp, out: seen.setdefault(noise, [inp[0].clone()]) and None)
        out = net.sample(2, torch.Generator().manual_seed(0), steps=2)
        hook.remove()
        first = seen[noise][0]
        corr = torch.corrcoef(torch.stack([first[..., :-1].flatten(), first[..., 1:].flatten()]))[0, 1]
        assert (corr > 0.5) == (noise == "simplex"), (noise, float(corr))
        assert float(first.std()) == pytest.approx(1.0, abs=0.15)  # pure noise, not scaled data
        # MONAI zero-initialises the UNet's output, so the predicted clean slice is the clipped noise itself: at
        # the clip of +-5 standardised units, i.e. +-1.25 in the diffusion's space divided by data_scale.
        assert float(out.abs().max()) == pytest.approx(5.0, rel=1e-5)


def test_sample_steps_keep_to_the_scheduler_stride():
    net = build_net(tiny("ddpm"))  # train_steps 200
    assert net.sampling_chain(4) == [199, 149, 99, 49]
    assert net.sampling_chain(3) == [199, 133, 67]
    assert net.sampling_chain(200)[-1] == 0
    for bad in (0, 201, 2.5):
        with pytest.raises(ValueError, match="steps"):
            net.sample(1, steps=bad)
    with pytest.raises(ValueError, match="samples"):
        net.sample(0)


@pytest.mark.parametrize("steps", [1, 7, 50])
def test_sampling_with_the_exact_noise_predictor_of_a_one_image_world_returns_that_image(steps):
    # If every healthy slice were the same image c, the ideal noise prediction at step t is known in closed form and
    # makes every step's clean-image estimate exactly c: the chain must end at c, in the units the net scores in,
    # from any start and for any step count. A sampler that returned the noisy state, lost the data scale or added
    # noise after the last step would not.
    net = build_net(tiny("ddpm"))
    target = torch.linspace(-1.5, 1.5, SIZE[0] * SIZE[1]).view(1, 1, *SIZE)
    c = target * net.data_scale
    alphas = net.ddim.alphas_cumprod

    def ideal(z, t, cond):
        a = alphas[t].view(-1, 1, 1, 1).to(z)
        return (z - a.sqrt() * c) / (1 - a).sqrt()

    net._predict = ideal
    out = net.sample(3, torch.Generator().manual_seed(1), steps=steps)
    torch.testing.assert_close(out, target.expand(3, -1, -1, -1), atol=1e-4, rtol=0)


def test_pddpm_and_cddpm_refuse_to_sample_and_ldm_needs_its_first_stage():
    with pytest.raises(ValueError, match="patch"):
        build_net(tiny("pddpm")).sample(1)
    with pytest.raises(ValueError, match="condition"):
        build_net(tiny("cddpm")).sample(1)
    with pytest.raises(RuntimeError, match="first stage"):
        build_net(tiny("ldm")).sample(1)


# ----------------------------------------------------------------------------------------------- the encoder
def test_encoder_features_average_every_level():
    enc = tiny_encoder()
    x, _ = brain_batch(5)
    f = encoder_features(enc.net, x.numpy(), batch=2)
    assert f.shape == (5, 4 + 8) and f.dtype == np.float64
    with torch.no_grad():
        levels = enc.net.features(x)
    assert np.allclose(f[:, :4], levels[0].mean(dim=(2, 3)).numpy(), atol=1e-6)
    assert np.allclose(f[:, 4:], levels[1].mean(dim=(2, 3)).numpy(), atol=1e-6)


def test_load_encoder_takes_the_dpa_feature_net(tmp_path):
    folder, features = encoder_folder(tmp_path / "enc", SIZE)
    enc = load_encoder(str(folder))
    assert enc.name == "enc" and enc.modality == "T1" and not enc.net.training
    x, _ = brain_batch(3)
    assert np.allclose(encoder_features(enc.net, x), encoder_features(features, x), atol=1e-6)
    untrained, _ = encoder_folder(tmp_path / "untrained", SIZE, ready_flag=False)
    with pytest.raises(ModelError, match="never trained"):
        load_encoder(str(untrained))
    with pytest.raises(ModelError, match="no model named"):
        load_encoder("no-such-encoder")


def test_load_encoder_refuses_a_model_without_a_feature_net(intensity_model):
    with pytest.raises(ModelError, match="no feature net"):
        load_encoder(str(intensity_model.path))


def test_the_shipped_encoder_loads():
    try:
        resolve_model("dpa-t1-ixi")
    except ModelError:
        pytest.skip("dpa-t1-ixi is not installed")
    enc = load_encoder()
    assert enc.modality == "T1" and tuple(enc.net.size) == (112, 96) and enc.net.in_channels == 1
    x = torch.zeros(2, 1, 112, 96)
    assert encoder_features(enc.net, x).shape == (2, 32 + 64 + 64)


# ----------------------------------------------------------------------------------------------- the report
@pytest.mark.parametrize("t", ["ddpm", "ldm"])
def test_report_writes_realism_json_and_samples(t, tmp_path):
    held, training = brain_batch(6, seed=1), brain_batch(8, seed=2)
    net = ready(build_net(tiny(t)), training[0])
    result = realism_report(net, held, training, tiny_encoder(), n=4, steps=2, out_dir=tmp_path, modality="T1",
                            about={"held_out": "test"})
    saved = json.loads((tmp_path / "realism.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert set(result["fd"]) == {"samples", "training", "blurred_training"}
    assert all(np.isfinite(v) and v >= 0 for v in result["fd"].values())
    assert result["n_samples"] == 4 and result["n_training_reference"] == 4 and result["n_held_out"] == 6
    assert result["model_type"] == t and result["steps"] == 2 and result["held_out"] == "test"
    assert result["feature_dims"] == 12 and result["encoder"] == "tiny"
    assert (tmp_path / "samples.png").stat().st_size > 1000
    # The blurred reference is the training reference degraded: they differ.
    assert result["fd"]["blurred_training"] != result["fd"]["training"]


def test_report_refuses_an_encoder_that_does_not_fit():
    held, training = brain_batch(4, seed=1), brain_batch(4, seed=2)
    net = build_net(tiny("ddpm"))
    with pytest.raises(ValueError, match="trained on \\(64, 64\\)"):
        realism_report(net, held, training, tiny_encoder(size=(64, 64)), n=2, steps=1)
    with pytest.raises(ValueError, match="channel"):
        realism_report(net, held, training, tiny_encoder(in_channels=3), n=2, steps=1)
    with pytest.raises(ValueError, match="FLAIR"):
        realism_report(net, held, training, tiny_encoder(), n=2, steps=1, modality="FLAIR")
    with pytest.raises(ValueError, match="patch"):
        realism_report(build_net(tiny("pddpm")), held, training, tiny_encoder(), n=2, steps=1)


def test_the_hook_skips_types_that_cannot_sample_and_zero_samples(tmp_path):
    for kind, n in (("pddpm", 4), ("dae", 4), ("ddpm", 0)):
        assert check_after_training(kind, {}, {}, [], [], None, None, tmp_path, "T1",
                                    {"realism_samples": n}) is None
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------- training
GRID_DDPM = {"channels": [8, 8, 8, 16], "attention_levels": [False, False, False, True], "norm_groups": 4,
             "head_channels": 8, "train_steps": 100, "t_stars": [20], "ddim_steps": 1, "noise": "gaussian"}
GRID_LDM = {"channels": [8, 16], "attention_levels": [False, True], "norm_groups": 4, "head_channels": 8,
            "train_steps": 100, "t_stars": [20], "ddim_steps": 1,
            "vqvae": {"type": "vqvae", "channels": [8, 8], "num_embeddings": 16, "embedding_dim": 4}}


@pytest.mark.parametrize("kind,arch,encoder_found", [("ddpm", GRID_DDPM, True), ("ldm", GRID_LDM, False)])
def test_training_reports_realism_or_says_why_not(kind, arch, encoder_found, tmp_path, capsys):
    csv = _cohort(tmp_path, n=6)
    # On the 4 mm grid: the report is what is tested, not the grid (training, calibration and sampling on an
    # eighth of the voxels).
    grid = small_grid()
    encoder = str(encoder_folder(tmp_path / "enc", grid.size[1::-1])[0]) if encoder_found else "no-such-encoder"
    options = {"epochs": 1, "steps_per_epoch": 1, "val_batches": 1, "batch_size": 4, "device": "cpu",
               "residual_norm": "none", "arch": dict(arch, size=list(grid.size[1::-1])), "realism_samples": 3,
               "realism_steps": 2, "realism_encoder": encoder}
    pre = PreprocessConfig(skull_strip="none", bias_correction=False, registration="none")
    folder = train(kind, csv, "T1", tmp_path / "model", Reporter(), cache_dir=tmp_path / "cache", pre=pre,
                   options=options, allow_few_scans=True, grid=grid)
    realism = json.loads((folder / "training" / "realism.json").read_text())
    assert (folder / "model.json").is_file() and (folder / "training" / "net" / "training.json").is_file()
    if encoder_found:
        assert realism["encoder"] == "enc" and realism["n_samples"] == 3 and realism["steps"] == 2
        assert all(np.isfinite(v) for v in realism["fd"].values())
        assert realism["held_out"].startswith("calibration split: 1 subjects")
        assert (folder / "training" / "samples.png").is_file()
    else:
        assert "no-such-encoder" in realism["skipped"] and "fd" not in realism
        assert not (folder / "training" / "samples.png").exists()
        assert "realism check skipped" in capsys.readouterr().err

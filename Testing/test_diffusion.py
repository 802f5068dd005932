"""The diffusion scorers (nets/diffusion.py, nets/latent_diffusion.py, nets/simplex.py): arch defaults and checks,
simplex noise, the DDIM schedule of each noise level, training lowers the noise-prediction loss, deterministic and
batch-independent reconstructions, the ldm's frozen first stage and latent masking, and the scorers end to end
(fit, save, load, score twice). Tiny nets, CPU, one thread."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from BrainAnomalyLib.store.models import load_model, save_model  # noqa: E402
from BrainAnomalyLib.nets import DIFFUSION_ARCHS, build_net, count_parameters, default_arch  # noqa: E402
from BrainAnomalyLib.nets.diffusion import ddim_level  # noqa: E402
from BrainAnomalyLib.nets.simplex import simplex_noise  # noqa: E402
from BrainAnomalyLib.detection.pipeline import Detector  # noqa: E402
from BrainAnomalyLib.detection.postprocess import PostprocessConfig  # noqa: E402
from BrainAnomalyLib.preprocess.chain import PreprocessConfig  # noqa: E402
from BrainAnomalyLib.core.progress import Reporter  # noqa: E402
from BrainAnomalyLib.scorers import scorer_class  # noqa: E402
from BrainAnomalyLib.core.template import Grid  # noqa: E402
from BrainAnomalyLib.training.run import base_meta  # noqa: E402
from conftest import small_grid, small_template_cohort, template_cohort  # noqa: E402

SIZE = [32, 32]
UNET = {"channels": [8, 16], "attention_levels": [False, True], "norm_groups": 4, "head_channels": 8,
        "train_steps": 200, "t_stars": [50, 100], "ddim_steps": 2}
VQ = {"type": "vqvae", "channels": [8, 8], "num_embeddings": 16, "embedding_dim": 4}
TINY = {
    "ddpm": dict(UNET, simplex_scale=8.0, simplex_octaves=2),
    "pddpm": dict(UNET, patch=[16, 16], patch_stride=[16, 16]),
    "cddpm": dict(UNET, cond_channels=[8, 8], cond_tokens=2, cond_dim=8),
    "vqvae": dict(VQ),
    "ldm": dict(UNET, vqvae=VQ),
}
# For the scorers, on the slices of half-resolution grid volumes (56 x 48, see conftest.small_template_cohort):
# attention only at the coarsest level, as in the defaults, and few UNet passes per slice (one noise level, two DDIM
# steps). Every diffusion kind is the same LearnedScorer around its net, and the nets' own round trips are tested
# above for each kind: end to end, a one-stage kind (ddpm) and the two-stage one (ldm).
GRID_UNET = dict(UNET, channels=[8, 8, 8, 16], attention_levels=[False, False, False, True], t_stars=[100])
GRID_TINY = {"ddpm": dict(TINY["ddpm"], **GRID_UNET), "ldm": dict(TINY["ldm"], t_stars=[100])}
SMALL_GRID = small_grid()
LOSS_KEYS = {"ddpm": {"loss", "eps"}, "pddpm": {"loss", "eps"}, "cddpm": {"loss", "eps"},
             "vqvae": {"loss", "rec", "quant"}, "ldm": {"loss", "eps"}}
SCORER_KINDS = ("ddpm", "ldm")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(t, in_channels=1, size=SIZE, **changes):
    arch = {"type": t, "in_channels": in_channels, **TINY[t], **changes}
    if size is not None:
        arch["size"] = list(size)
    return arch


def brain_batch(b=4, c=1, size=SIZE, seed=0):
    """Standardised-looking slices: an ellipse of 'white matter' with a darker rim and dark 'ventricles', 0 outside
    the brain mask (B, 1, H, W) bool."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    images, masks = [], []
    for _ in range(b):
        r = 0.7 + 0.15 * torch.rand(2, generator=g)
        d = (yy / r[0]) ** 2 + (xx / r[1]) ** 2
        mask = d < 1
        img = torch.where(d < 0.6, torch.tensor(1.0), torch.tensor(-0.5))
        img = torch.where((yy / 0.25) ** 2 + (xx / 0.12) ** 2 < 1, torch.tensor(-2.0), img)
        img = img + 0.05 * torch.randn(h, w, generator=g)
        images.append((img * mask).expand(c, h, w))
        masks.append(mask[None])
    return torch.stack(images).contiguous(), torch.stack(masks)


def ready(net, x=None):
    """An ldm needs its first stage set (here an untrained vqvae: built, not fitted)."""
    if net.type_name == "ldm":
        net.set_first_stage(build_net(net.arch["vqvae"]), x if x is not None else brain_batch(4, net.in_channels)[0])
    return net


# ----------------------------------------------------------------------------------------------- arch
@pytest.mark.parametrize("t", DIFFUSION_ARCHS)
def test_default_arch_builds_within_budget_and_round_trips(t):
    arch = default_arch(t)
    assert arch["type"] == t and arch["size"] == [112, 96] and arch["in_channels"] == 1
    net = build_net(arch)
    assert json.loads(json.dumps(net.arch)) == net.arch == build_net(net.arch).arch
    n = count_parameters(net)
    assert 100_000 < n <= 6_000_000 and 4 * n < 50e6, f"{t}: {n} parameters"
    if t != "vqvae":
        assert [t0 for t0, _ in net.noise_levels] == net.arch["t_stars"]  # the defaults need no snapping


def test_bad_arch_values_are_value_errors():
    cases = [
        (dict(tiny("ddpm"), t_stars=[50, 200]), "below train_steps"),
        (dict(tiny("ddpm"), ddim_steps=60), "ddim_steps"),
        (dict(tiny("ddpm"), t_stars=[]), "t_stars"),
        (dict(tiny("ddpm"), noise="pink"), "noise"),
        (dict(tiny("ddpm"), schedule="quadratic"), "schedule"),
        (dict(tiny("ddpm"), attention_levels=[True]), "attention_levels"),
        (dict(tiny("ddpm"), attention_levels=[0, 1]), "attention_levels"),
        (dict(tiny("ddpm"), norm_groups=3), "norm_groups"),
        (dict(tiny("ddpm"), head_channels=6), "head_channels"),
        (dict(tiny("ddpm"), size=[31, 32]), "divisible"),
        (dict(tiny("ddpm"), data_scale=0), "data_scale"),
        (dict(tiny("ddpm"), rec_loss="l3"), "rec_loss"),
        (dict(tiny("pddpm"), patch=[40, 16]), "patch"),
        (dict(tiny("pddpm"), patch_stride=[20, 16]), "patch_stride"),
        (dict(tiny("cddpm"), attention_levels=[False, False]), "attention level"),
        (dict(tiny("vqvae"), decay=1.0), "decay"),
        (dict(tiny("ldm"), vqvae={"type": "feature_net"}), "vqvae"),
        (dict(tiny("ldm"), vqvae=dict(VQ, in_channels=3)), "in_channels"),
        (dict(tiny("ldm"), mask_residual="yes"), "mask_residual"),
        (dict(tiny("ldm"), size=[36, 36]), "divisible"),
        (dict(tiny("ldm"), t_stars=[50], tstar=3), "unknown hyperparameter"),
    ]
    for arch, match in cases:
        with pytest.raises(ValueError, match=match):
            build_net(arch)


def test_ddim_levels_snap_to_strides_monai_can_take():
    assert ddim_level(250, 5, 1000) == (250, 50, 20)
    assert ddim_level(500, 1, 1000) == (500, 500, 2)
    t0, r, n = ddim_level(300, 2, 1000)  # 150 is no stride 1000 // n: the nearest start is taken
    assert r == 1000 // n and t0 == 2 * r and abs(t0 - 300) <= 20
    t0, r, _ = ddim_level(999, 1, 1000)
    assert t0 < 1000


# ----------------------------------------------------------------------------------------------- simplex noise
def test_simplex_noise_is_seeded_standardised_and_smooth():
    a = simplex_noise((3, 2, 64, 48), scale=16.0, octaves=4, generator=torch.Generator().manual_seed(0))
    b = simplex_noise((3, 2, 64, 48), scale=16.0, octaves=4, generator=torch.Generator().manual_seed(0))
    c = simplex_noise((3, 2, 64, 48), scale=16.0, octaves=4, generator=torch.Generator().manual_seed(1))
    assert a.shape == (3, 2, 64, 48) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    fields = a.flatten(2)
    assert fields.mean(dim=2).abs().max() < 1e-4 and (fields.std(dim=2) - 1).abs().max() < 1e-3
    assert not torch.allclose(a[0, 0], a[0, 1]) and not torch.allclose(a[0, 0], a[1, 0])  # independent fields

    def neighbour_corr(v):
        return float(torch.corrcoef(torch.stack([v[..., :-1].flatten(), v[..., 1:].flatten()]))[0, 1])

    assert neighbour_corr(a) > 0.7 and abs(neighbour_corr(torch.randn(3, 2, 64, 48))) < 0.1
    coarse = simplex_noise((8, 1, 64, 64), scale=32.0, octaves=1, generator=torch.Generator().manual_seed(2))
    assert neighbour_corr(coarse) > neighbour_corr(a)  # fewer octaves: smoother
    with pytest.raises(ValueError, match="scale"):
        simplex_noise((1, 1, 8, 8), scale=0)


def test_ddpm_trains_and_scores_with_the_noise_it_is_given():
    x, m = brain_batch(2)
    for noise in ("gaussian", "simplex"):
        net = build_net(tiny("ddpm", noise=noise))
        drawn = net.scoring_noise(0, (1, *SIZE))
        assert drawn.shape == (1, 1, *SIZE) and drawn.device.type == "cpu"
        assert torch.equal(drawn, build_net(net.arch).scoring_noise(0, (1, *SIZE)))  # seeded from the arch
        assert not torch.equal(drawn, net.scoring_noise(1, (1, *SIZE)))  # every level its own noise
        other_seed = build_net(dict(net.arch, seed=1)).scoring_noise(0, (1, *SIZE))
        assert not torch.equal(drawn, other_seed)
        neighbours = torch.corrcoef(torch.stack([drawn[..., :-1].flatten(), drawn[..., 1:].flatten()]))[0, 1]
        assert (neighbours > 0.5) == (noise == "simplex")
        assert torch.isfinite(net.training_losses(x, m)["loss"])


# ----------------------------------------------------------------------------------------------- nets
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("t", DIFFUSION_ARCHS)
def test_shapes_and_losses(t, in_channels):
    torch.manual_seed(0)
    x, m = brain_batch(3, in_channels)
    net = ready(build_net(tiny(t, in_channels)), x)
    losses = net.training_losses(x, m, generator=torch.Generator().manual_seed(0))
    assert set(losses) == LOSS_KEYS[t]
    assert all(v.dim() == 0 and torch.isfinite(v) for v in losses.values())
    assert losses["loss"].requires_grad
    recon = net.reconstruct(x)
    assert recon.shape == x.shape and not recon.requires_grad and torch.isfinite(recon).all()
    maps = net.score_maps(x, recon)
    assert {"signed", "l1", "ssim"} <= set(maps) and all(v.shape == (3, 1, *SIZE) for v in maps.values())
    with pytest.raises(ValueError, match="input"):
        net.training_losses(torch.zeros(3, in_channels + 1, *SIZE), m)
    with pytest.raises(ValueError, match="mask"):
        net.training_losses(x, m[:, :, :16])


@pytest.mark.parametrize("t", DIFFUSION_ARCHS)
def test_a_few_steps_reduce_the_loss(t):
    """A fixed batch and, for the comparison, fixed noise and steps: at initialisation the UNets predict zero noise
    (MONAI zero-initialises their last layer), so the loss starts near 1 and any learning shows."""
    torch.manual_seed(0)
    x, m = brain_batch(4, seed=5)
    net = ready(build_net(tiny(t)), x)
    # A vqvae's codebook first collapses onto a few codes: a gentler rate gets it out of that within the steps here.
    opt = torch.optim.Adam(net.param_groups()["main"], 3e-3 if t == "vqvae" else 1e-2)

    def loss_at_fixed_noise():
        net.train()
        with torch.no_grad():
            return float(net.training_losses(x, m, generator=torch.Generator().manual_seed(7))["loss"])

    before = loss_at_fixed_noise()
    g = torch.Generator().manual_seed(1)
    for _ in range(40 if t in ("vqvae", "ldm") else 12):  # those two are cheap; their losses fall slower
        opt.zero_grad()
        net.training_losses(x, m, generator=g)["loss"].backward()
        opt.step()
    after = loss_at_fixed_noise()
    assert after < 0.85 * before, (before, after)


@pytest.mark.parametrize("t", DIFFUSION_ARCHS)
def test_reconstruct_is_deterministic_batch_independent_and_restores_the_mode(t):
    torch.manual_seed(0)
    x, m = brain_batch(4)
    net = ready(build_net(tiny(t)), x)
    net.train()
    a = net.reconstruct(x)
    assert net.training
    assert torch.equal(net.reconstruct(x), a)
    assert torch.allclose(net.reconstruct(x[1:3]), a[1:3], atol=1e-5)
    assert torch.allclose(net.reconstruct(x[2:3]), a[2:3], atol=1e-5)
    again = build_net(json.loads(json.dumps(net.arch)))
    again.load_state_dict(net.state_dict())
    assert torch.equal(again.reconstruct(x), a)


def test_the_ensemble_averages_its_levels():
    torch.manual_seed(0)
    net = build_net(tiny("ddpm"))
    x, _ = brain_batch(2)
    with torch.no_grad():
        levels = net.level_reconstructions(x)
        single = [build_net(dict(net.arch, t_stars=[t])) for t in net.arch["t_stars"]]
    assert len(levels) == 2 and not torch.equal(levels[0], levels[1])
    assert torch.allclose(net.reconstruct(x), (levels[0] + levels[1]) / 2, atol=1e-6)
    signed = net.score_maps(x, net.reconstruct(x))["signed"]
    per_level = [net.score_maps(x, r)["signed"] for r in levels]
    assert torch.allclose(signed, (per_level[0] + per_level[1]) / 2, atol=1e-5)
    assert single[0].noise_levels == net.noise_levels[:1]


def test_pddpm_patches_cover_the_slice_and_keep_the_context_clean():
    net = build_net(tiny("pddpm", patch=[16, 12], patch_stride=[8, 12]))
    corners = net.grid_corners((32, 32))
    masks = net._patch_masks(torch.tensor(corners), (32, 32), "cpu")
    assert masks.sum(dim=0).min() >= 1  # every pixel reconstructed at least once (the last column flush right)
    assert (0, 20) in corners and (16, 0) in corners
    x, _ = brain_batch(2)
    seen = []
    hook = net.unet.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().clone()))
    net.reconstruct(x)
    hook.remove()
    first = seen[0]  # the first patch's first step: noisy inside the patch, the clean input (scaled) outside
    patch = first[:, 1:2]
    assert torch.equal(patch, masks[0:1].expand(2, -1, -1, -1))
    outside = patch == 0
    assert torch.allclose(first[:, :1][outside], (x * net.data_scale)[outside])
    assert not torch.allclose(first[:, :1][~outside], (x * net.data_scale)[~outside])


def test_cddpm_conditions_on_the_clean_input():
    torch.manual_seed(0)
    net = build_net(tiny("cddpm"))
    x, m = brain_batch(2)
    net.training_losses(x, m, generator=torch.Generator().manual_seed(0))["loss"].backward()
    assert all(p.grad is not None for p in net.encoder.parameters())
    with torch.no_grad():  # MONAI zero-initialises the output and attention projections: give them weights
        for p in net.unet.parameters():
            if not p.any():
                p.normal_(0, 0.1)
        xt = torch.randn(2, 1, *SIZE)
        t = torch.full((2,), 50)
        a = net._predict(xt, t, net._condition(x))
        b = net._predict(xt, t, net._condition(x.flip(-1) * 0.5))
    assert not torch.allclose(a, b)


# ----------------------------------------------------------------------------------------------- ldm
def test_ldm_first_stage_is_frozen_scaled_and_shipped():
    torch.manual_seed(0)
    x, m = brain_batch(4)
    ldm = build_net(tiny("ldm"))
    with pytest.raises(RuntimeError, match="first stage"):
        ldm.training_losses(x, m)
    with pytest.raises(RuntimeError, match="first stage"):
        ldm.reconstruct(x)
    vq = build_net(ldm.arch["vqvae"])
    opt = torch.optim.Adam(vq.param_groups()["main"], 1e-2)
    for _ in range(3):
        opt.zero_grad()
        vq.training_losses(x, m)["loss"].backward()
        opt.step()
    with pytest.raises(ValueError, match="arch"):
        ldm.set_first_stage(build_net(dict(vq.arch, num_embeddings=8)), x)
    ldm.set_first_stage(vq, x.numpy())
    with torch.no_grad():
        vq.eval()
        std = float(vq.encode(x).std())
    assert float(ldm.latent_scale) == pytest.approx(1.0 / std, rel=1e-5)
    assert all(not p.requires_grad for p in ldm.vqvae.parameters())
    assert {id(p) for p in ldm.param_groups()["main"]} == {id(p) for p in ldm.unet.parameters()}
    ldm.train()
    assert not ldm.vqvae.training
    before = {k: v.clone() for k, v in ldm.vqvae.state_dict().items()}
    ldm.training_losses(x, m)["loss"].backward()
    assert all(p.grad is None for p in ldm.vqvae.parameters())
    assert all(torch.equal(before[k], v) for k, v in ldm.vqvae.state_dict().items())  # no codebook update
    again = build_net(ldm.arch)
    again.load_state_dict(ldm.state_dict())  # weights, latent scale and the ready flag, from the state_dict alone
    assert torch.equal(again.reconstruct(x), ldm.reconstruct(x))


def test_ldm_replaces_only_the_latents_the_diffusion_changes():
    torch.manual_seed(0)
    x, _ = brain_batch(2)
    nothing = ready(build_net(tiny("ldm", latent_threshold=1e6)), x)
    assert torch.equal(nothing.reconstruct(x), x)  # nothing flagged: the map is zero everywhere
    everything = build_net(dict(nothing.arch, latent_threshold=0.0))
    everything.load_state_dict(nothing.state_dict())
    plain = build_net(dict(nothing.arch, latent_threshold=0.0, mask_residual=False))
    plain.load_state_dict(nothing.state_dict())
    r_all, r_plain = everything.reconstruct(x), plain.reconstruct(x)
    assert not torch.equal(r_all, x)
    with torch.no_grad():
        z0 = everything._latents(x)
        changes = [everything.latent_change(z0, everything.denoise(z0, k)) for k in range(2)]
    if all((c > 0).all() for c in changes):  # every cell flagged: the mask is 1 everywhere, the two agree
        assert torch.allclose(r_all, r_plain, atol=1e-5)


# ----------------------------------------------------------------------------------------------- scorers
def fit_tiny(kind, tmp_path=None, report=False):
    arch = dict(GRID_TINY[kind])
    options = {"epochs": 2, "steps_per_epoch": 2, "val_batches": 2, "batch_size": 8, "device": "cpu", "seed": 3,
               "arch": arch}
    if tmp_path is not None:
        options["checkpoint_dir"] = str(tmp_path / "ckpt")
        if report:
            options["report_dir"] = str(tmp_path / "report")
    return scorer_class(kind).fit(small_template_cohort(2, seed=1), {"direction": "hypo"}, Reporter(),
                                  validation=small_template_cohort(1, seed=2), options=options)


@pytest.mark.parametrize("kind", SCORER_KINDS)
def test_fit_save_load_score(kind, tmp_path):
    params, tensors = fit_tiny(kind, tmp_path, report=kind == "ldm")
    assert params["arch"]["type"] == kind and params["score"] == "signed"
    history = params["training"]["history"]
    assert history["net"]["epochs_run"] == 2
    if kind == "ldm":  # two-stage: the vqvae first, then the diffusion model on its latents
        assert history["vqvae"]["epochs_run"] == 2
        assert (tmp_path / "ckpt" / "vqvae").is_dir() and (tmp_path / "report" / "net" / "loss_curves.png").is_file()
        assert "net.vqvae.vqvae.quantizer.quantizer.embedding.weight" in tensors
        assert float(tensors["net.first_stage_ready"]) == 1.0 and float(tensors["net.latent_scale"]) != 1.0
    meta = base_meta(kind, f"tiny-{kind}", "T1", "test", SMALL_GRID, PreprocessConfig(), PostprocessConfig(),
                     params)
    model = load_model(save_model(tmp_path / "model", meta, tensors))
    image, mask = next(small_template_cohort(1, seed=5))
    first = Detector(model, device="cpu").score_grid(image, mask)
    again = Detector(load_model(tmp_path / "model"), device="cpu").score_grid(image, mask)
    assert first.raw_map.shape == image.shape and np.isfinite(first.raw_map).all()
    assert np.array_equal(first.raw_map, again.raw_map)
    assert not first.raw_map[~mask].any() and first.raw_map[mask].any()
    assert first.reconstruction is not None and first.reconstruction.shape == image.shape


def test_scoring_batch_size_does_not_change_the_map():
    params, tensors = fit_tiny("ldm")
    image, mask = next(small_template_cohort(1, seed=5))
    maps = [scorer_class("ldm")(dict(params, batch_size=b), tensors).score(image, mask, Reporter()).anomaly_map
            for b in (7, 80)]
    assert np.allclose(maps[0], maps[1], atol=1e-5)


def test_an_untrained_ldm_of_default_widths_scores_a_full_grid_volume():
    """Built, not trained (vqvae untrained too): the whole path runs on a full-size grid volume, one noise level."""
    arch = dict(default_arch("ldm"), t_stars=[250], ddim_steps=2)
    torch.manual_seed(0)
    net = build_net(arch)
    image, mask = next(template_cohort(1, seed=5))
    assert image.shape == tuple(reversed(Grid().size))
    net.set_first_stage(build_net(net.arch["vqvae"]), image[::8, None])
    tensors = {f"net.{k}": v.numpy() for k, v in net.state_dict().items()}
    scorer = scorer_class("ldm")({"arch": net.arch, "batch_size": 80, "direction": "hypo"}, tensors)
    out = scorer.score(image, mask, Reporter())
    assert out.anomaly_map.shape == image.shape and np.isfinite(out.anomaly_map).all()
    assert out.reconstruction.shape == image.shape and np.isfinite(out.reconstruction).all()

"""The slice networks of BrainAnomalyLib.nets: the arch registry, shapes, losses, training reduces the loss, eval
determinism, the coarse noise of the DAE, the frozen feature net of the DPA, the discriminator's separate gradients,
parameter budgets. Tiny nets on 32 x 32 synthetic 'brain' slices, CPU only."""

from __future__ import annotations

import json

import pytest
import torch

from BrainAnomalyLib.nets import ARCHS, build_net, coarse_noise, count_parameters, default_arch
from BrainAnomalyLib.nets.base import ssim_map

SIZE = [32, 32]

TINY = {
    "ae_dense": {"channels": [4, 8], "strides": [2, 2], "latent": 8},
    "ae_spatial": {"channels": [4, 8], "strides": [2, 2], "latent_channels": 2},
    "vae": {"channels": [4, 8], "strides": [2, 2], "latent": 8},
    "cae": {"channels": [4, 8], "strides": [2, 2], "latent": 8},
    "anovaegan": {"channels": [4, 8], "strides": [2, 2], "latent": 8, "disc_channels": 4, "disc_layers": 2},
    "dae": {"features": [4, 4, 8, 8, 8, 4], "noise_res": [4, 4]},
    "feature_net": {"channels": [4, 8, 8], "feature_layers": [1, 2], "norm_groups": 2, "hole_size": [4, 8],
                    "noise_res": [4, 4]},
}
TINY["dpa"] = {"ae": dict(TINY["ae_dense"], type="ae_dense"), "feature_net": dict(TINY["feature_net"],
                                                                                 type="feature_net")}

LOSS_KEYS = {
    "ae_dense": {"loss", "rec"}, "ae_spatial": {"loss", "rec"}, "vae": {"loss", "rec", "kl"},
    "cae": {"loss", "rec", "consistency"}, "anovaegan": {"loss", "d_loss", "rec", "kl", "adv"},
    "dae": {"loss", "rec"}, "feature_net": {"loss", "rec", "hole"}, "dpa": {"loss", "perceptual", "pixel"},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_arch(t, in_channels=1):
    return {"type": t, "in_channels": in_channels, "size": SIZE, **TINY[t]}


def brain_batch(b=4, c=1, size=SIZE, seed=0):
    """Synthetic standardised slices: an ellipse of 'white matter' with a 'grey matter' rim and dark 'ventricles',
    varying in size and position, a little noise, 0 outside the (bool) brain mask."""
    g = torch.Generator().manual_seed(seed)
    h, w = size
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    images, masks = [], []
    for _ in range(b):
        r = 0.7 + 0.15 * torch.rand(2, generator=g)
        cy, cx = 0.1 * (torch.rand(2, generator=g) - 0.5)
        d = ((yy - cy) / r[0]) ** 2 + ((xx - cx) / r[1]) ** 2
        mask = d < 1
        chans = []
        for k in range(c):
            img = torch.where(d < 0.6, torch.tensor(1.0), torch.tensor(-0.5))
            vent = ((yy - cy) / 0.25) ** 2 + ((xx - cx) / (0.12 + 0.03 * k)) ** 2 < 1
            img = torch.where(vent, torch.tensor(-2.0), img) + 0.05 * torch.randn(h, w, generator=g)
            chans.append(img * mask)
        images.append(torch.stack(chans))
        masks.append(mask[None])
    return torch.stack(images), torch.stack(masks)


def ready(net, seed=1):
    """A dpa needs a trained feature net first: train a tiny one a few steps and set it; other nets as they are."""
    if net.type_name == "dpa":
        fn = build_net(net.arch["feature_net"])
        x, m = brain_batch(4, net.in_channels, seed=seed)
        opt = torch.optim.Adam(fn.param_groups()["main"], 1e-2)
        for _ in range(5):
            opt.zero_grad()
            fn.training_losses(x, m)["loss"].backward()
            opt.step()
        net.set_feature_net(fn)
    return net


# ----------------------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("t", ARCHS)
def test_default_arch_builds_within_budget_and_round_trips(t):
    arch = default_arch(t)
    assert arch["type"] == t and arch["in_channels"] == 1 and arch["size"] == [112, 96]
    net = build_net(arch)
    assert json.loads(json.dumps(net.arch)) == net.arch
    assert net.arch == build_net(net.arch).arch
    n = count_parameters(net)
    assert 50_000 < n <= 6_000_000, f"{t}: {n} parameters"
    if t != "dpa":  # the dpa's ae and feature net are covered by their own types
        with torch.no_grad():
            out = net.reconstruct(torch.zeros(2, 1, 112, 96))
        assert out.shape == (2, 1, 112, 96)


@pytest.mark.parametrize("t", ARCHS)
def test_rebuild_from_arch_gives_identical_outputs(t):
    torch.manual_seed(0)
    net = ready(build_net(tiny_arch(t)))
    x, m = brain_batch(seed=3)
    # a training step moves batch-norm statistics too, so the copy has to carry buffers as well as weights
    opt = torch.optim.Adam(net.param_groups()["main"], 1e-2)
    net.train()
    net.training_losses(x, m)["loss"].backward()
    opt.step()
    again = build_net(json.loads(json.dumps(net.arch)))
    assert again.arch == net.arch
    again.load_state_dict(net.state_dict())
    assert torch.equal(net.reconstruct(x), again.reconstruct(x))
    fresh = build_net(net.arch)  # same arch, other weights: the comparison above can fail
    assert not torch.equal(net.reconstruct(x), fresh.reconstruct(x))


def test_unknown_type_key_or_bad_value_is_a_value_error():
    with pytest.raises(ValueError, match="unknown network type"):
        build_net({"type": "transformer"})
    with pytest.raises(ValueError, match="unknown network type"):
        default_arch("transformer")
    with pytest.raises(ValueError, match="type"):
        build_net({"latent": 3})
    with pytest.raises(ValueError, match="unknown hyperparameter.*'latnet'"):
        build_net({"type": "vae", "latnet": 3})
    with pytest.raises(ValueError, match="divisible"):
        build_net({"type": "ae_dense", "size": [30, 32], "channels": [4, 8], "strides": [2, 2]})
    with pytest.raises(ValueError, match="strides"):
        build_net({"type": "ae_spatial", "channels": [4, 8], "strides": [2]})
    with pytest.raises(ValueError, match="rec_loss"):
        build_net({"type": "dae", "rec_loss": "l3"})
    with pytest.raises(ValueError, match="beta"):
        build_net({"type": "vae", "beta": -1})
    with pytest.raises(ValueError, match="ae"):
        build_net({"type": "dpa", "ae": {"type": "vae"}})
    with pytest.raises(ValueError, match="in_channels"):
        build_net({"type": "dpa", "in_channels": 1, "ae": {"type": "ae_dense", "in_channels": 3}})


def test_missing_hyperparameters_take_the_defaults():
    net = build_net({"type": "vae", "latent": 16, "in_channels": 3})
    expected = default_arch("vae", in_channels=3)
    expected["latent"] = 16
    assert net.arch == expected
    dpa = build_net({"type": "dpa", "in_channels": 2, "size": SIZE, "ae": {"type": "ae_spatial", **TINY["ae_spatial"]},
                     "feature_net": {"type": "feature_net", **TINY["feature_net"]}})
    assert dpa.arch["ae"]["in_channels"] == 2 and dpa.arch["ae"]["size"] == SIZE
    assert dpa.arch["ae"]["num_res_units"] == 0  # filled from ae_spatial's defaults


# ----------------------------------------------------------------------------------------------- shapes, losses
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("t", ARCHS)
def test_shapes_and_losses(t, in_channels):
    torch.manual_seed(0)
    net = ready(build_net(tiny_arch(t, in_channels)))
    x, m = brain_batch(3, in_channels)
    losses = net.training_losses(x, m)
    assert set(losses) == LOSS_KEYS[t]
    for k, v in losses.items():
        assert v.dim() == 0 and torch.isfinite(v), (k, v)
    assert losses["loss"].requires_grad
    recon = net.reconstruct(x)
    assert recon.shape == x.shape and not recon.requires_grad
    maps = net.score_maps(x, recon)
    assert {"signed", "l1", "ssim"} <= set(maps)
    assert ("perceptual" in maps) == (t == "dpa")
    for k, v in maps.items():
        assert v.shape == (3, 1, *SIZE) and torch.isfinite(v).all(), k
    with pytest.raises(ValueError, match="input"):
        net.training_losses(torch.zeros(3, in_channels + 1, *SIZE), m)
    with pytest.raises(ValueError, match="mask"):
        net.training_losses(x, m[:, :, :16])


@pytest.mark.parametrize("t", ARCHS)
def test_a_few_steps_reduce_the_loss(t):
    torch.manual_seed(0)
    net = ready(build_net(tiny_arch(t)))
    x, m = brain_batch(4, seed=5)
    groups = net.param_groups()
    opts = {k: torch.optim.Adam(v, 1e-2) for k, v in groups.items()}

    def loss_at_fixed_noise():
        net.train()
        return float(net.training_losses(x, m, generator=torch.Generator().manual_seed(7))["loss"].detach())

    before = loss_at_fixed_noise()
    for _ in range(25):
        for o in opts.values():
            o.zero_grad()
        losses = net.training_losses(x, m)
        losses["loss"].backward()
        if "d_loss" in losses:
            opts["disc"].zero_grad()
            losses["d_loss"].backward()
        for o in opts.values():
            o.step()
    after = loss_at_fixed_noise()
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("t", ARCHS)
def test_reconstruct_is_deterministic_and_restores_the_mode(t):
    torch.manual_seed(0)
    net = ready(build_net(tiny_arch(t)))
    x, m = brain_batch(4)
    net.train()
    net.training_losses(x, m)  # a train-mode pass (moves batch-norm statistics)
    a = net.reconstruct(x)
    b = net.reconstruct(x)
    assert torch.equal(a, b)
    assert net.training  # mode restored
    net.eval()
    assert torch.equal(net.reconstruct(x), a) and not net.training


@pytest.mark.parametrize("t", ["vae", "anovaegan", "dae", "feature_net"])
def test_stochastic_losses_follow_the_seed(t):
    net = build_net(tiny_arch(t))
    x, m = brain_batch(4)
    torch.manual_seed(11)
    a = net.training_losses(x, m)["rec"]
    torch.manual_seed(11)
    b = net.training_losses(x, m)["rec"]
    c = net.training_losses(x, m, generator=torch.Generator().manual_seed(12))["rec"]
    assert a == b and a != c


@pytest.mark.parametrize("t", ARCHS)
def test_param_groups_cover_every_trainable_parameter_once(t):
    net = build_net(tiny_arch(t))
    groups = net.param_groups()
    assert set(groups) == ({"main", "disc"} if t == "anovaegan" else {"main"})
    ids = [id(p) for g in groups.values() for p in g]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in net.parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------- score maps
def test_score_maps_signs_and_ssim():
    net = build_net(tiny_arch("ae_spatial", 2))
    x, _ = brain_batch(2, 2)
    recon = x.clone()
    recon[:, :, 8:16, 8:16] -= 1.0  # the observed image is brighter there (hyperintense)
    maps = net.score_maps(x, recon)
    inside = torch.zeros(1, 1, *SIZE, dtype=torch.bool)
    inside[..., 8:16, 8:16] = True
    assert torch.allclose(maps["signed"][inside.expand(2, -1, -1, -1)], torch.tensor(1.0))
    assert torch.allclose(maps["signed"][~inside.expand(2, -1, -1, -1)], torch.tensor(0.0))
    assert torch.equal(maps["l1"], net.score_maps(recon, x)["l1"])
    assert torch.equal(maps["signed"], -net.score_maps(recon, x)["signed"])
    assert maps["ssim"][..., 10:14, 10:14].min() > 0.05
    assert maps["ssim"][..., 28:, 28:].abs().max() < 1e-3
    assert torch.allclose(ssim_map(x, x), torch.ones(2, 1, *SIZE))
    recon[:, 1] = x[:, 1]  # only channel 0 differs now
    maps = net.score_maps(x, recon)
    assert torch.allclose(maps["signed"][inside.expand(2, -1, -1, -1)], torch.tensor(0.5))
    assert torch.equal(net.score_maps(x, recon, channel=1)["l1"], torch.zeros(2, 1, *SIZE))
    assert torch.allclose(net.score_maps(x, recon, channel=0)["l1"], 2 * maps["l1"])
    with pytest.raises(ValueError, match="channel"):
        net.score_maps(x, recon, channel=2)


# ----------------------------------------------------------------------------------------------- DAE noise
def test_dae_noise_is_coarse_inside_the_mask_and_seeded():
    size = (112, 96)
    mask = torch.zeros(8, 1, *size, dtype=torch.bool)
    mask[:, :, 20:90, 15:80] = True
    noise = coarse_noise((8, 2, *size), (14, 12), 0.2, mask=mask, generator=torch.Generator().manual_seed(0))
    assert noise.shape == (8, 2, *size)
    assert torch.equal(noise[:, 0], noise[:, 1])  # one field through the neighbouring slices
    assert (noise[~mask.expand(-1, 2, -1, -1)] == 0).all()
    inner = noise[:, 0, 20:90, 15:80]
    assert 0.08 < inner.std() < 0.2

    def neighbour_corr(a):
        u, v = a[..., :, :-1].flatten(), a[..., :, 1:].flatten()
        return float(torch.corrcoef(torch.stack([u, v]))[0, 1])

    assert neighbour_corr(inner) > 0.9
    assert abs(neighbour_corr(0.2 * torch.randn(8, 70, 65))) < 0.1  # what pixel noise would give
    # low-pass: almost all the power sits in the lowest spatial frequencies
    power = torch.fft.rfft2(noise[:, 0] - noise[:, 0].mean()).abs() ** 2
    fy = torch.fft.fftfreq(size[0]).abs()[:, None]
    fx = torch.fft.rfftfreq(size[1])[None, :]
    low = (fy < 0.125) & (fx < 0.125)  # below the 8-pixel cell's frequency
    assert power[:, low].sum() / power.sum() > 0.9
    again = coarse_noise((8, 2, *size), (14, 12), 0.2, mask=mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(noise, again)
    assert not torch.equal(noise[0], noise[1])


def test_dae_trains_on_noisy_inputs_and_reconstructs_the_clean_one():
    net = build_net(tiny_arch("dae"))
    x, m = brain_batch(4)
    net.train()
    clean = build_net(dict(net.arch, noise_std=0.0))
    clean.load_state_dict(net.state_dict())
    clean.train()
    torch.manual_seed(0)
    noisy_loss = net.training_losses(x, m)["rec"]
    clean_loss = clean.training_losses(x, m)["rec"]
    assert noisy_loss != clean_loss  # training_losses corrupts its input
    seen = {}
    net.unet.register_forward_hook(lambda mod, inp, out: seen.__setitem__("input", inp[0]))
    torch.manual_seed(0)
    net.training_losses(x, m)
    torch.manual_seed(0)
    expected = x + net.noise(x, m.float())
    assert torch.allclose(seen["input"], expected)
    net.reconstruct(x)
    assert torch.equal(seen["input"], x)  # one pass on the clean input


@pytest.mark.parametrize("t", ["ae_dense", "ae_spatial", "vae", "cae", "anovaegan", "dpa"])
def test_autoencoders_train_as_denoisers_when_asked(t):
    """noise_std > 0: the network's first layer sees the coarse-noised slice (noise inside the brain only, seeded),
    the loss is against the clean slice, and reconstruct() is still one pass on the clean input. noise_std = 0 (the
    default) leaves the input as it is."""
    arch = tiny_arch(t)
    if t == "dpa":
        arch["ae"] = dict(arch["ae"], noise_std=0.5, noise_res=[4, 4])
    else:
        arch.update(noise_std=0.5, noise_res=[4, 4])
    net = build_net(arch)
    ae = net.ae if t == "dpa" else net
    if t == "dpa":
        net.set_feature_net(build_net(net.arch["feature_net"]))
    x, m = brain_batch(4)
    mf = m.float()
    assert ae.corrupt(x, mf) is not x
    off = build_net(dict(ae.arch, noise_std=0.0))
    assert off.corrupt(x, mf) is x
    first = next(mod for mod in ae.modules() if isinstance(mod, torch.nn.Conv2d))
    seen = []
    first.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().clone()))
    losses = net.training_losses(x, m, generator=torch.Generator().manual_seed(3))
    assert torch.isfinite(losses["loss"])
    expected = ae.corrupt(x, mf, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(seen[0], expected)
    changed = (seen[0] != x)
    assert changed[m].any() and not changed[~m].any()
    seen.clear()
    ae.reconstruct(x)
    assert torch.equal(seen[0], x)


# ----------------------------------------------------------------------------------------------- DPA, feature net
def test_dpa_feature_net_is_frozen_and_ships_in_the_state_dict():
    torch.manual_seed(0)
    dpa = build_net(tiny_arch("dpa"))
    x, m = brain_batch(4)
    with pytest.raises(RuntimeError, match="feature net"):
        dpa.training_losses(x, m)
    fn = build_net(dpa.arch["feature_net"])
    with pytest.raises(ValueError, match="arch"):
        dpa.set_feature_net(build_net(dict(fn.arch, norm_groups=1)))
    dpa.set_feature_net(fn)
    for k, v in fn.state_dict().items():
        assert torch.equal(dpa.state_dict()["feature_net." + k], v)
    assert all(not p.requires_grad for p in dpa.feature_net.parameters())
    frozen = {id(p) for p in dpa.feature_net.parameters()}
    assert not frozen & {id(p) for g in dpa.param_groups().values() for p in g}
    dpa.train()
    assert not dpa.feature_net.training
    before = {k: v.clone() for k, v in dpa.feature_net.state_dict().items()}
    opt = torch.optim.Adam(dpa.param_groups()["main"], 1e-2)
    for _ in range(3):
        opt.zero_grad()
        dpa.training_losses(x, m)["loss"].backward()
        opt.step()
    assert all(p.grad is None for p in dpa.feature_net.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in dpa.ae.parameters())
    for k, v in dpa.feature_net.state_dict().items():
        assert torch.equal(before[k], v)
    # a rebuilt DPA loads the feature weights (and the ready flag) from the state_dict alone
    again = build_net(dpa.arch)
    again.load_state_dict(dpa.state_dict())
    recon = again.reconstruct(x)
    assert torch.equal(again.score_maps(x, recon)["perceptual"], dpa.score_maps(x, recon)["perceptual"])


def test_perceptual_map_sees_a_local_change():
    torch.manual_seed(0)
    dpa = ready(build_net(tiny_arch("dpa")))
    x, _ = brain_batch(2)
    changed = x.clone()
    changed[:, :, 4:12, 4:12] += 2.0
    p = dpa.score_maps(x, changed)["perceptual"]
    assert p.shape == (2, 1, *SIZE)
    assert p[..., 4:12, 4:12].mean() > 3 * p[..., 20:, 20:].mean()
    assert dpa.score_maps(x, x)["perceptual"].abs().max() == 0


def test_feature_net_features_are_multiscale():
    fn = build_net(default_arch("feature_net"))
    feats = fn.features(torch.zeros(1, 1, 112, 96))
    assert [tuple(f.shape[2:]) for f in feats] == [(56, 48), (28, 24), (14, 12)]


# ----------------------------------------------------------------------------------------------- GAN, VAE, CAE
def test_anovaegan_gradients_stay_in_their_groups():
    torch.manual_seed(0)
    net = build_net(tiny_arch("anovaegan"))
    x, m = brain_batch(4)
    groups = net.param_groups()
    losses = net.training_losses(x, m)
    losses["loss"].backward(retain_graph=True)
    assert all(p.grad is None for p in groups["disc"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["main"])
    net.zero_grad(set_to_none=True)
    losses["d_loss"].backward()
    assert all(p.grad is None for p in groups["main"])
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups["disc"])
    # the adversarial term reaches the generator: its gradients differ from those of the same net without it
    grads = []
    for weight in (0.0, 1.0):
        gan = build_net(dict(net.arch, adv_weight=weight))
        gan.load_state_dict(net.state_dict())
        gan.training_losses(x, m, generator=torch.Generator().manual_seed(1))["loss"].backward()
        grads.append(torch.cat([p.grad.flatten() for p in gan.param_groups()["main"]]))
    assert not torch.allclose(grads[0], grads[1])


def test_vae_restoration_lowers_its_energy_inside_the_mask_only():
    torch.manual_seed(0)
    net = build_net(tiny_arch("vae", 2))
    x, m = brain_batch(3, 2)
    xr = net.restore(x, m, steps=5)
    assert xr.shape == x.shape and not xr.requires_grad
    assert torch.equal(xr, net.restore(x, m, steps=5))
    outside = ~m.expand_as(x)
    assert torch.equal(xr[outside], x[outside])
    assert not torch.equal(xr, x)
    with torch.no_grad():
        e0 = net.restoration_energy(x, x, m.float(), 0.5).sum()
        e1 = net.restoration_energy(xr, x, m.float(), 0.5).sum()
    assert e1 < e0


def test_cae_code_is_normalised_and_consistency_is_the_code_distance():
    torch.manual_seed(0)
    net = build_net(tiny_arch("cae"))
    x, m = brain_batch(4)
    z = net.encode(x)
    assert torch.allclose(z.mean(1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(z.pow(2).mean(1), torch.ones(4), atol=1e-3)
    losses = net.training_losses(x, m)
    expected = (z - net.encode(net.decode(z))).pow(2).mean()
    assert torch.allclose(losses["consistency"], expected)
    assert torch.allclose(losses["loss"], losses["rec"] + net.consistency_weight * losses["consistency"])


def test_cae_with_a_spatial_code():
    """bottleneck "spatial": the code is maps at 1/4 resolution, normalised over each slice's whole code; the
    consistency term is the same; any size divisible by the stride works; dense is still the default."""
    torch.manual_seed(0)
    assert build_net(tiny_arch("cae")).arch["bottleneck"] == "dense"
    net = build_net(dict(tiny_arch("cae"), bottleneck="spatial", latent_channels=3))
    x, m = brain_batch(4)
    z = net.encode(x)
    assert z.shape == (4, 3, 8, 8)
    flat = z.flatten(1)
    assert torch.allclose(flat.mean(1), torch.zeros(4), atol=1e-5)
    assert torch.allclose(flat.pow(2).mean(1), torch.ones(4), atol=1e-3)
    losses = net.training_losses(x, m)
    expected = (z - net.encode(net.decode(z))).pow(2).mean()
    assert torch.allclose(losses["consistency"], expected)
    assert net.reconstruct(torch.randn(2, 1, 48, 40)).shape == (2, 1, 48, 40)
    with pytest.raises(ValueError, match="bottleneck"):
        build_net(dict(tiny_arch("cae"), bottleneck="global"))
    again = build_net(net.arch)
    again.load_state_dict(net.state_dict())
    assert torch.equal(again.reconstruct(x), net.reconstruct(x))


def test_score_maps_computes_only_the_parts_asked_for():
    net = ready(build_net(tiny_arch("dpa", 1)))
    x, _ = brain_batch(2, 1)
    recon = net.reconstruct(x)
    everything = net.score_maps(x, recon)
    for parts in (["signed"], ["perceptual", "signed"], ["ssim"], ["l1", "perceptual"]):
        some = net.score_maps(x, recon, parts=parts)
        assert set(some) == set(parts)
        for k in parts:
            assert torch.equal(some[k], everything[k]), k

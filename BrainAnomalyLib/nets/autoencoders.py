"""Reconstruction autoencoders on 2D slices, built on conv_autoencoder.ConvAutoEncoder (MONAI's AutoEncoder where
residual units are asked for) and MONAI's VarAutoEncoder / PatchDiscriminator, each imported where it is built:

* ae_dense   - convolutional encoder, dense (fully connected) bottleneck of `latent` units (Baur et al. 2018).
* ae_spatial - fully convolutional, spatial bottleneck of `latent_channels` maps at 1/prod(strides) resolution.
* vae        - variational AE, dense latent; reconstruct = decode(mu); optional restoration (Chen et al. 2018).
* cae        - AE with a latent-consistency loss ||enc(x) - enc(dec(enc(x)))||^2 (Chen et al. 2018); the code (dense, or
               spatial with bottleneck="spatial") is layer-normalised (per sample zero mean, unit RMS) so the term
               cannot be cheated by shrinking the code.
* anovaegan  - VAE generator plus a least-squares PatchGAN discriminator on its reconstructions (Baur et al. 2018).

All reconstruct every input channel. Losses are brain-masked mean pixel errors ("l1" or "l2") plus `bg_weight` x the
error outside the brain.

Every one can also be trained as a denoising autoencoder (`noise_std` > 0, default 0 = off): the input is corrupted
with the DAE's coarse, lesion-sized noise inside the brain (`noise_res` = its coarse grid) and the loss compares the
output with the clean slice. A bottleneck alone lets a network keep a large dark region if it fits in the code; the
denoising objective teaches it to replace such regions with healthy tissue (Kascenas et al. 2022). Scoring is
unchanged: one pass on the observed slice.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import (ACTS, NORMS, REC_LOSSES, SliceNet, check_choice, check_float, check_int, check_ints,
                   check_layer_name, check_size, eval_mode, kl_divergence, mask_float, pixel_error,
                   reconstruction_loss)
from .conv_autoencoder import ConvAutoEncoder
from .noise import coarse_noise


def _prod(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out *= v
    return out


def _autoencoder(in_channels: int, channels: Sequence[int], strides: Sequence[int], num_res_units: int, act: str,
                 norm: str) -> nn.Module:
    """The encoder-decoder pair (`.encode`, `.decode`): ConvAutoEncoder without residual units (torch alone, so the
    shipped models score without importing MONAI), MONAI's AutoEncoder, with the same parameter names, with them."""
    if num_res_units == 0:
        return ConvAutoEncoder(in_channels, in_channels, channels, strides, act, norm)
    from monai.networks.nets import AutoEncoder

    return AutoEncoder(spatial_dims=2, in_channels=in_channels, out_channels=in_channels, channels=channels,
                       strides=strides, num_res_units=num_res_units, act=act, norm=norm)


def _common_defaults(type_name: str, in_channels: int, size: Sequence[int]) -> dict:
    return {"type": type_name, "in_channels": int(in_channels), "size": [int(s) for s in size],
            "channels": [32, 64, 128, 128], "strides": [2, 2, 2, 2], "num_res_units": 0,
            "act": "PRELU", "norm": "BATCH", "rec_loss": "l1", "bg_weight": 0.1,
            "noise_std": 0.0, "noise_res": [max(1, int(size[0]) // 8), max(1, int(size[1]) // 8)]}


class _ConvAEBase(SliceNet):
    """Checks of the hyperparameters shared by the MONAI-backed autoencoders."""

    def _check_common(self) -> None:
        a = self.arch
        check_int(a, "in_channels")
        self.channels = check_ints(a, "channels")
        self.strides = check_ints(a, "strides", length=len(self.channels))
        self.stride_factor = _prod(self.strides)
        check_size(a, self.stride_factor)
        self.num_res_units = check_int(a, "num_res_units", low=0)
        self.act = check_layer_name(a, "act", ACTS)
        self.norm = check_layer_name(a, "norm", NORMS)
        self.rec_kind = check_choice(a, "rec_loss", REC_LOSSES)
        self.bg_weight = check_float(a, "bg_weight")
        self.noise_std = check_float(a, "noise_std")
        self.noise_res = check_ints(a, "noise_res", length=2)
        if any(r > s for r, s in zip(self.noise_res, self.size)):
            raise ValueError(f"arch {a['type']!r}: noise_res {self.noise_res} must not exceed the size "
                             f"{list(self.size)}")

    def _rec(self, recon, x, m):
        return reconstruction_loss(recon, x, m, self.rec_kind, self.bg_weight)

    def _build_spatial_body(self) -> None:
        """The autoencoder (_autoencoder) whose bottleneck is a stride-1 layer of `latent_channels` maps at the
        coarsest resolution (after _check_common)."""
        self.latent_channels = check_int(self.arch, "latent_channels")
        self.body = _autoencoder(self.in_channels, self.channels + [self.latent_channels], self.strides + [1],
                                 self.num_res_units, self.act, self.norm)

    def corrupt(self, x: torch.Tensor, m: torch.Tensor, generator=None) -> torch.Tensor:
        """The training input: x plus coarse noise inside the brain mask m (B, 1, H, W); x itself when noise_std
        is 0."""
        if self.noise_std == 0.0:
            return x
        return x + coarse_noise(x.shape, self.noise_res, self.noise_std, mask=m, generator=generator,
                                device=x.device, dtype=x.dtype)


class DenseAE(_ConvAEBase):
    """The autoencoder's (_autoencoder) encoder and decoder with a fully connected bottleneck of `latent` units
    between them."""

    type_name = "ae_dense"
    fixed_size = True

    @staticmethod
    def defaults(in_channels: int = 1, size: Sequence[int] = (112, 96)) -> dict:
        d = _common_defaults("ae_dense", in_channels, size)
        d["latent"] = 128
        return d

    def __init__(self, arch: dict) -> None:
        super().__init__(arch)
        self._check_common()
        self.latent = check_int(self.arch, "latent")
        self.body = _autoencoder(self.in_channels, self.channels, self.strides, self.num_res_units, self.act,
                                 self.norm)
        self.code_shape = (self.channels[-1], self.size[0] // self.stride_factor, self.size[1] // self.stride_factor)
        flat = self.code_shape[0] * self.code_shape[1] * self.code_shape[2]
        self.to_latent = nn.Linear(flat, self.latent)
        self.from_latent = nn.Linear(self.latent, flat)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body.encode(x)
        return self.to_latent(h.flatten(1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.from_latent(z).view(z.shape[0], *self.code_shape)
        return self.body.decode(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def training_losses(self, x, mask, generator=None):
        self.check_input(x)
        m = mask_float(mask, x)
        rec = self._rec(self(self.corrupt(x, m, generator)), x, m)
        return {"loss": rec, "rec": rec.detach()}


class SpatialAE(_ConvAEBase):
    """The autoencoder (_autoencoder), fully convolutional; the bottleneck is a stride-1 layer of `latent_channels`
    maps at the coarsest resolution."""

    type_name = "ae_spatial"

    @staticmethod
    def defaults(in_channels: int = 1, size: Sequence[int] = (112, 96)) -> dict:
        d = _common_defaults("ae_spatial", in_channels, size)
        d["latent_channels"] = 16
        return d

    def __init__(self, arch: dict) -> None:
        super().__init__(arch)
        self._check_common()
        self._build_spatial_body()

    def encode(self, x):
        return self.body.encode(x)

    def decode(self, z):
        return self.body.decode(z)

    def forward(self, x):
        return self.decode(self.encode(x))

    def training_losses(self, x, mask, generator=None):
        self.check_input(x)
        m = mask_float(mask, x)
        rec = self._rec(self(self.corrupt(x, m, generator)), x, m)
        return {"loss": rec, "rec": rec.detach()}


class ConstrainedAE(DenseAE):
    """AE whose code is layer-normalised, trained with rec + consistency_weight * mean (z - enc(dec(z)))^2.
    bottleneck "dense" (default): DenseAE's `latent` units; "spatial": SpatialAE's `latent_channels` maps at the
    coarsest resolution, normalised over the whole code of each slice (any slice size divisible by the stride)."""

    type_name = "cae"
    BOTTLENECKS = ("dense", "spatial")

    @staticmethod
    def defaults(in_channels: int = 1, size: Sequence[int] = (112, 96)) -> dict:
        d = DenseAE.defaults(in_channels, size)
        d.update(type="cae", consistency_weight=1.0, bottleneck="dense", latent_channels=16)
        return d

    def __init__(self, arch: dict) -> None:
        self.spatial = check_choice(arch, "bottleneck", self.BOTTLENECKS) == "spatial"
        if not self.spatial:
            super().__init__(arch)
        else:
            SliceNet.__init__(self, arch)
            self._check_common()
            self._build_spatial_body()
            self.fixed_size = False
        self.consistency_weight = check_float(self.arch, "consistency_weight")

    def encode(self, x):
        if self.spatial:
            h = self.body.encode(x)
            return F.layer_norm(h, tuple(h.shape[1:]))
        return F.layer_norm(super().encode(x), (self.latent,))

    def decode(self, z):
        return self.body.decode(z) if self.spatial else super().decode(z)

    def training_losses(self, x, mask, generator=None):
        self.check_input(x)
        m = mask_float(mask, x)
        z = self.encode(self.corrupt(x, m, generator))
        recon = self.decode(z)
        rec = self._rec(recon, x, m)
        consistency = (z - self.encode(recon)).pow(2).mean()
        loss = rec + self.consistency_weight * consistency
        return {"loss": loss, "rec": rec.detach(), "consistency": consistency.detach()}


class VAE(_ConvAEBase):
    """MONAI VarAutoEncoder (no output sigmoid: intensities are standardised, not in [0, 1]).

    loss = rec + beta * kl, with rec the brain-masked mean pixel error of the decoded sample and kl the KL divergence
    per sample divided by the number of values in a slice (C*H*W), so both are per pixel. reconstruct = decode(mu).
    """

    type_name = "vae"
    fixed_size = True
    LOGVAR_RANGE = (-12.0, 8.0)

    @staticmethod
    def defaults(in_channels: int = 1, size: Sequence[int] = (112, 96)) -> dict:
        d = _common_defaults("vae", in_channels, size)
        d.update(latent=128, beta=1.0)
        return d

    def __init__(self, arch: dict) -> None:
        super().__init__(arch)
        self._check_common()
        self.latent = check_int(self.arch, "latent")
        self.beta = check_float(self.arch, "beta")
        from monai.networks.nets import VarAutoEncoder

        c = self.in_channels
        self.body = VarAutoEncoder(spatial_dims=2, in_shape=(c, *self.size), out_channels=c, latent_size=self.latent,
                                   channels=self.channels, strides=self.strides, num_res_units=self.num_res_units,
                                   act=self.act, norm=self.norm, use_sigmoid=False)
        self.values_per_slice = c * self.size[0] * self.size[1]

    def encode(self, x):
        mu, logvar = self.body.encode_forward(x)
        return mu, logvar.clamp(*self.LOGVAR_RANGE)

    def decode(self, z):
        return self.body.decode_forward(z, use_sigmoid=False)

    def forward(self, x):
        return self.decode(self.encode(x)[0])

    def sample(self, mu, logvar, generator=None):
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps

    def _vae_terms(self, x, m, generator):
        mu, logvar = self.encode(self.corrupt(x, m, generator))
        recon = self.decode(self.sample(mu, logvar, generator))
        rec = self._rec(recon, x, m)
        kl = kl_divergence(mu, logvar).mean() / self.values_per_slice
        return recon, rec, kl

    def training_losses(self, x, mask, generator=None):
        self.check_input(x)
        m = mask_float(mask, x)
        _, rec, kl = self._vae_terms(x, m, generator)
        loss = rec + self.beta * kl
        return {"loss": loss, "rec": rec.detach(), "kl": kl.detach()}

    def restoration_energy(self, xr: torch.Tensor, x: torch.Tensor, m: torch.Tensor, weight: float) -> torch.Tensor:
        """Per-slice negative ELBO of xr (with the code at its mean, so it is deterministic) plus `weight` x the
        distance to the observed image, as sums over the brain (so a pixel's gradient does not shrink with the
        slice size): shape (B,)."""
        mu, logvar = self.encode(xr)
        err = pixel_error(self.decode(mu), xr, self.rec_kind).mean(1, keepdim=True) * m
        dist = (xr - x).abs().mean(1, keepdim=True) * m
        kl = kl_divergence(mu, logvar) / self.in_channels
        return err.flatten(1).sum(1) + self.beta * kl + weight * dist.flatten(1).sum(1)

    def restore(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None, steps: int = 10,
                step_size: float = 0.05, weight: float = 0.5) -> torch.Tensor:
        """Restoration (Chen et al. 2018): `steps` gradient steps on the image, from x, lowering the negative ELBO
        plus `weight` * |xr - x|_1; only pixels inside `mask` move. Deterministic, eval mode; returns xr detached.
        The anomaly maps are then score_maps(x, xr)."""
        self.check_input(x)
        m = torch.ones_like(x[:, :1]) if mask is None else mask_float(mask, x)
        xr = x.detach().clone()
        with eval_mode(self), torch.enable_grad():
            for _ in range(steps):
                xr.requires_grad_(True)
                energy = self.restoration_energy(xr, x, m, weight).sum()
                (grad,) = torch.autograd.grad(energy, xr)
                xr = (xr - step_size * grad * m).detach()
        return xr


class AnoVAEGAN(VAE):
    """VAE generator plus MONAI PatchDiscriminator (instance norm) judging reconstructions against the input.

    loss   = rec + beta * kl + adv_weight * adv, adv = mean (D(recon) - 1)^2 (least squares GAN). D's weights enter
             this term detached, so "loss" leaves gradients on the generator only.
    d_loss = 0.5 * (mean (D(x) - 1)^2 + mean D(recon.detach())^2): gradients on the discriminator only.
    """

    type_name = "anovaegan"

    @staticmethod
    def defaults(in_channels: int = 1, size: Sequence[int] = (112, 96)) -> dict:
        d = VAE.defaults(in_channels, size)
        d.update(type="anovaegan", adv_weight=0.02, disc_channels=16, disc_layers=3)
        return d

    def __init__(self, arch: dict) -> None:
        super().__init__(arch)
        self.adv_weight = check_float(self.arch, "adv_weight")
        disc_channels = check_int(self.arch, "disc_channels")
        disc_layers = check_int(self.arch, "disc_layers")
        from monai.networks.nets import PatchDiscriminator

        self.disc = PatchDiscriminator(spatial_dims=2, channels=disc_channels, in_channels=self.in_channels,
                                       out_channels=1, num_layers_d=disc_layers, norm="INSTANCE")

    def discriminate(self, x: torch.Tensor, detached_weights: bool = False) -> torch.Tensor:
        if detached_weights:
            params = {k: v.detach() for k, v in self.disc.named_parameters()}
            params.update(dict(self.disc.named_buffers()))
            return torch.func.functional_call(self.disc, params, (x,))[-1]
        return self.disc(x)[-1]

    def training_losses(self, x, mask, generator=None):
        self.check_input(x)
        m = mask_float(mask, x)
        recon, rec, kl = self._vae_terms(x, m, generator)
        adv = (self.discriminate(recon, detached_weights=True) - 1.0).pow(2).mean()
        loss = rec + self.beta * kl + self.adv_weight * adv
        d_real = self.discriminate(x)
        d_fake = self.discriminate(recon.detach())
        d_loss = 0.5 * ((d_real - 1.0).pow(2).mean() + d_fake.pow(2).mean())
        return {"loss": loss, "d_loss": d_loss, "rec": rec.detach(), "kl": kl.detach(), "adv": adv.detach()}

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        disc = [p for p in self.disc.parameters() if p.requires_grad]
        ids = {id(p) for p in disc}
        return {"main": [p for p in self.parameters() if p.requires_grad and id(p) not in ids], "disc": disc}

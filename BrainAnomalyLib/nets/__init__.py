"""Learned anomaly scorers' networks on 2D axial slices (C, H=112, W=96) of the template grid.

    net = build_net({"type": "vae", "latent": 64})   # missing hyperparameters come from default_arch
    net.arch                                         # the completed, JSON-serialisable arch: build_net(net.arch)
    net.training_losses(x, mask[, generator])        # {"loss": ..., ["d_loss": ...], parts for logging}
    net.param_groups()                               # {"main": [...]} (+ "disc" for anovaegan)
    net.reconstruct(x)                               # deterministic pseudo-healthy image, eval mode, no grad
    net.score_maps(x, recon)                         # {"signed", "l1", "ssim"[, "perceptual"]}: (B, 1, H, W)

Types (ARCHS): ae_dense, ae_spatial, vae, cae, anovaegan (autoencoders.py; conv_autoencoder.py's ConvAutoEncoder, or
MONAI's AutoEncoder with residual units, VarAutoEncoder, PatchDiscriminator), dae (dae.py; MONAI BasicUNet, coarse
noise from noise.py), feature_net and dpa (perceptual.py). With in_channels > 1 (neighbouring slices as context)
every net reconstructs all channels; the maps average over channels, or use one (score_maps(..., channel=k), e.g.
the centre slice).

Training a DPA: train a feature_net on healthy slices first (its own training_losses: the inpainting + denoising
pretext), then net = build_net({"type": "dpa", "feature_net": feature_net.arch, ...}); net.set_feature_net(it).

Diffusion types (DIFFUSION_ARCHS): ddpm, pddpm, cddpm (diffusion.py; AnoDDPM partial noising + DDIM, patched and
conditioned DDPM) and ldm with its first stage vqvae (latent_diffusion.py). Training an ldm is two-stage like a dpa:
fit a vqvae, then net.set_first_stage(vqvae, training slices). A net class naming its first stage's arch key in
`first_stage_key` is trained that way by scorers/learned_fit.py. ddpm and ldm also draw slices from pure noise:
net.sample(n, generator, steps) (pddpm and cddpm refuse; evaluation/realism.py judges the samples).
"""

from __future__ import annotations

from typing import Dict, Mapping, Sequence, Type

from .autoencoders import VAE, AnoVAEGAN, ConstrainedAE, DenseAE, SpatialAE
from .base import DEFAULT_SIZE, SliceNet, perceptual_map
from .dae import DenoisingAE
from .diffusion import ConditionedDDPM, PatchedDDPM, PixelDiffusion
from .latent_diffusion import LatentDDPM, VQVAENet
from .noise import coarse_noise
from .perceptual import DPA, FeatureNet

ARCHS = ("ae_dense", "ae_spatial", "vae", "cae", "anovaegan", "dae", "feature_net", "dpa")
# Kept apart from ARCHS: their tests (Testing/test_diffusion.py) need other tiny configurations and training budgets.
DIFFUSION_ARCHS = ("ddpm", "pddpm", "cddpm", "vqvae", "ldm")
ALL_ARCHS = ARCHS + DIFFUSION_ARCHS

NETS: Dict[str, Type[SliceNet]] = {
    "ae_dense": DenseAE, "ae_spatial": SpatialAE, "vae": VAE, "cae": ConstrainedAE, "anovaegan": AnoVAEGAN,
    "dae": DenoisingAE, "feature_net": FeatureNet, "dpa": DPA,
    "ddpm": PixelDiffusion, "pddpm": PatchedDDPM, "cddpm": ConditionedDDPM, "vqvae": VQVAENet, "ldm": LatentDDPM,
}


def _net_class(type_name) -> Type[SliceNet]:
    if type_name not in NETS:
        raise ValueError(f"unknown network type {type_name!r}; choose from {', '.join(ALL_ARCHS)}")
    return NETS[type_name]


def default_arch(type: str, in_channels: int = 1, size: Sequence[int] = DEFAULT_SIZE) -> dict:
    """Small default hyperparameters of network `type` for slices of `size` (H, W) with `in_channels` channels."""
    return _net_class(type).default_arch(in_channels, size)


def build_net(arch: Mapping) -> SliceNet:
    """Network from an arch dict {"type": one of ALL_ARCHS, **hyperparameters}; hyperparameters left out take the
    defaults of default_arch(type, arch's in_channels, arch's size). Unknown types or keys, and bad values, raise
    ValueError."""
    if not isinstance(arch, Mapping) or "type" not in arch:
        raise ValueError(f"an arch must be a dict with a 'type' (one of {', '.join(ALL_ARCHS)}), got {arch!r}")
    return _net_class(arch["type"]).from_arch(arch)


def count_parameters(net) -> int:
    """All parameters (frozen ones included: they are part of the weights file too)."""
    return sum(p.numel() for p in net.parameters())


__all__ = ["ARCHS", "DIFFUSION_ARCHS", "ALL_ARCHS", "NETS", "build_net", "default_arch", "count_parameters",
           "coarse_noise", "perceptual_map", "SliceNet", "DenseAE", "SpatialAE", "VAE", "ConstrainedAE", "AnoVAEGAN",
           "DenoisingAE", "FeatureNet", "DPA", "PixelDiffusion", "PatchedDDPM", "ConditionedDDPM", "VQVAENet",
           "LatentDDPM"]

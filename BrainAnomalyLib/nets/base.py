"""What every slice network shares: the arch bookkeeping, input checks, brain-masked losses, and the per-pixel maps
(signed and absolute residual, 1 - local SSIM) a scorer chooses from.

Conventions. A slice batch is x (B, C, H, W) float, standardised intensities (0 outside the brain); C > 1 means
neighbouring slices as extra channels (2.5D), and every net then reconstructs all C channels; maps average over
channels. The brain mask is (B, 1, H, W), bool or float in [0, 1].
"""

from __future__ import annotations

import copy
import json
import math
from contextlib import contextmanager
from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

REC_LOSSES = ("l1", "l2")
# (H, W) of an axial slice of the template grid.
DEFAULT_SIZE = (112, 96)
# Intensity span used by the SSIM constants, in standardised units (inside the brain, median 0 and IQR about 1:
# CSF to white matter covers a few units).
SSIM_DATA_RANGE = 4.0
SSIM_SIGMA = 1.5


# ----------------------------------------------------------------------------------------------- arch checks
def jsonable(value):
    """Tuples to lists, recursively, and check that the value survives JSON (so `net.arch` can go into model.json)."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, (int, float, str)):
        return value
    raise ValueError(f"arch values must be JSON-serialisable (numbers, strings, lists, dicts); got {value!r}")


def check_int(arch: dict, key: str, low: int = 1) -> int:
    v = arch[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"arch {arch['type']!r}: {key!r} must be an integer >= {low}, got {v!r}")
    return v


def check_float(arch: dict, key: str, low: float = 0.0) -> float:
    v = arch[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < low:
        raise ValueError(f"arch {arch['type']!r}: {key!r} must be a finite number >= {low}, got {v!r}")
    return float(v)


def check_ints(arch: dict, key: str, length: Optional[int] = None, low: int = 1, min_length: int = 1) -> List[int]:
    v = arch[key]
    if (not isinstance(v, (list, tuple)) or len(v) < min_length
            or any(isinstance(i, bool) or not isinstance(i, int) or i < low for i in v)):
        raise ValueError(f"arch {arch['type']!r}: {key!r} must be a list of at least {min_length} integers >= {low}, "
                         f"got {v!r}")
    if length is not None and len(v) != length:
        raise ValueError(f"arch {arch['type']!r}: {key!r} must have {length} entries, got {v!r}")
    return list(v)


def check_choice(arch: dict, key: str, choices: Sequence[str]) -> str:
    v = arch[key]
    if v not in choices:
        raise ValueError(f"arch {arch['type']!r}: {key!r} must be one of {tuple(choices)}, got {v!r}")
    return v


def check_size(arch: dict, factor: int) -> List[int]:
    """`size` = [H, W], both divisible by the total down-sampling `factor` of the net."""
    size = check_ints(arch, "size", length=2)
    if any(s % factor for s in size):
        raise ValueError(f"arch {arch['type']!r}: size {size} must be divisible by the total stride {factor} "
                         f"(product of 'strides')")
    return size


def check_layer_name(arch: dict, key: str, allowed: Sequence[str]) -> str:
    v = arch[key]
    if not isinstance(v, str) or v.upper() not in allowed:
        raise ValueError(f"arch {arch['type']!r}: {key!r} must be one of {tuple(allowed)}, got {v!r}")
    return v.upper()


NORMS = ("BATCH", "INSTANCE")
ACTS = ("PRELU", "RELU", "LEAKYRELU", "ELU", "GELU", "SWISH")


# ----------------------------------------------------------------------------------------------- losses and maps
def mask_float(mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Brain mask as float (B, 1, H, W) on x's device and dtype."""
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != x.shape[0] or mask.shape[2:] != x.shape[2:]:
        raise ValueError(f"mask must have shape (B, 1, H, W) = {(x.shape[0], 1, *x.shape[2:])}, "
                         f"got {tuple(mask.shape)}")
    return mask.to(device=x.device, dtype=x.dtype)


def masked_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean of `values` (B, C, h, w) over the pixels weighted by `weight` (B, 1, h, w), pooled over the batch (so a
    slice counts by its brain area); 0 where the weight is all zero."""
    total = weight.sum() * values.shape[1]
    return (values * weight).sum() / total.clamp_min(1e-6)


def pixel_error(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    d = a - b
    return d.abs() if kind == "l1" else d * d


def reconstruction_loss(recon: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, kind: str,
                        bg_weight: float) -> torch.Tensor:
    """Brain-masked mean pixel error, plus `bg_weight` times the mean error outside the brain (which keeps the output
    near 0 there, so windows crossing the brain edge (SSIM, features) do not see arbitrary values)."""
    err = pixel_error(recon, target, kind)
    loss = masked_mean(err, mask)
    if bg_weight > 0:
        loss = loss + bg_weight * masked_mean(err, 1.0 - mask)
    return loss


def _gaussian_kernel(sigma: float, device, dtype) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of every channel of x (B, C, H, W); borders replicated."""
    k = _gaussian_kernel(sigma, x.device, x.dtype)
    r = (k.numel() - 1) // 2
    c = x.shape[1]
    y = F.pad(x, (r, r, r, r), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def ssim_map(x: torch.Tensor, y: torch.Tensor, sigma: float = SSIM_SIGMA,
             data_range: float = SSIM_DATA_RANGE) -> torch.Tensor:
    """Local SSIM (Wang et al. 2004) with a Gaussian window of `sigma` pixels, per pixel, averaged over channels:
    (B, 1, H, W). 1 where the two images agree locally."""
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    mx, my = gaussian_blur(x, sigma), gaussian_blur(y, sigma)
    vx = gaussian_blur(x * x, sigma) - mx * mx
    vy = gaussian_blur(y * y, sigma) - my * my
    cxy = gaussian_blur(x * y, sigma) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return s.mean(dim=1, keepdim=True)


def residual_maps(x: torch.Tensor, recon: torch.Tensor, ssim_sigma: float = SSIM_SIGMA,
                  ssim_range: float = SSIM_DATA_RANGE, parts: Optional[Sequence[str]] = None
                  ) -> Dict[str, torch.Tensor]:
    """The pixel maps named in `parts` (all of them by default); SSIM's five blurs cost more than the network's
    decoder on the CPU, so a score that does not use it does not compute it."""
    d = x - recon
    make = {"signed": lambda: d.mean(dim=1, keepdim=True), "l1": lambda: d.abs().mean(dim=1, keepdim=True),
            "ssim": lambda: 1.0 - ssim_map(x, recon, ssim_sigma, ssim_range)}
    return {k: f() for k, f in make.items() if parts is None or k in parts}


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the latent, per sample: (B,)."""
    return 0.5 * (mu * mu + logvar.exp() - 1.0 - logvar).sum(dim=1)


@contextmanager
def eval_mode(module: nn.Module):
    was = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was)


# ----------------------------------------------------------------------------------------------- perceptual distance
def feature_distances(feature_net, x: torch.Tensor, recon: torch.Tensor,
                      x_features: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
    """Per layer, the channel mean of |F(x) - F(recon)|: list of (B, 1, h_l, w_l)."""
    fx = feature_net.features(x) if x_features is None else x_features
    fr = feature_net.features(recon)
    return [(a - b).abs().mean(dim=1, keepdim=True) for a, b in zip(fx, fr)]


@torch.no_grad()
def perceptual_map(feature_net, x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W): every layer's channel-mean |F(x) - F(recon)| upsampled bilinearly to (H, W), averaged over
    layers. (Channel mean rather than sum, so layers of different widths weigh the same.)"""
    maps = [F.interpolate(d, size=x.shape[2:], mode="bilinear", align_corners=False)
            for d in feature_distances(feature_net, x, recon)]
    return torch.stack(maps).mean(dim=0)



# ----------------------------------------------------------------------------------------------- the base class
class SliceNet(nn.Module):
    """Base of every slice network. Subclasses define `defaults`, build themselves from a checked arch, and
    implement `forward` (the deterministic reconstruction path) and `training_losses`."""

    type_name = ""
    # Whether the net needs exactly arch["size"] (dense layers) or any size divisible by its total stride.
    fixed_size = False

    def __init__(self, arch: dict) -> None:
        super().__init__()
        self.arch = copy.deepcopy(arch)
        json.dumps(self.arch)  # raises on anything not serialisable
        self.in_channels = arch["in_channels"]
        self.size = tuple(arch["size"])
        self.stride_factor = 1

    @staticmethod
    def defaults(in_channels: int, size: Sequence[int]) -> dict:
        raise NotImplementedError

    @classmethod
    def default_arch(cls, in_channels: int = 1, size: Sequence[int] = DEFAULT_SIZE) -> dict:
        """The type's small default hyperparameters for slices of `size` (H, W) with `in_channels` channels."""
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive integer, got {in_channels!r}")
        if not isinstance(size, (list, tuple)) or len(size) != 2:
            raise ValueError(f"size must be (H, W), got {size!r}")
        return jsonable(cls.defaults(in_channels, tuple(size)))

    @classmethod
    def from_arch(cls, arch: Mapping) -> "SliceNet":
        """The net of this type from an arch dict; hyperparameters left out take the defaults of
        default_arch(arch's in_channels, arch's size). Unknown keys and bad values raise ValueError."""
        full = cls.default_arch(arch.get("in_channels", 1), arch.get("size", DEFAULT_SIZE))
        unknown = sorted(set(arch) - set(full))
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {unknown} for network type {cls.type_name!r}; "
                             f"known: {sorted(k for k in full if k != 'type')}")
        full.update(copy.deepcopy(dict(arch)))
        return cls(jsonable(full))

    # ------------------------------------------------------------------ interface
    def check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{self.type_name}: input must be (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if self.fixed_size and tuple(x.shape[2:]) != self.size:
            raise ValueError(f"{self.type_name}: input slices must be {self.size} (dense bottleneck), "
                             f"got {tuple(x.shape[2:])}")
        if any(s % self.stride_factor for s in x.shape[2:]):
            raise ValueError(f"{self.type_name}: slice size {tuple(x.shape[2:])} must be divisible by "
                             f"{self.stride_factor}")

    def training_losses(self, x: torch.Tensor, mask: torch.Tensor,
                        generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        return {"main": [p for p in self.parameters() if p.requires_grad]}

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic pseudo-healthy image (B, C, H, W), computed in eval mode (the module's mode is restored)."""
        self.check_input(x)
        with eval_mode(self):
            return self(x)

    @torch.no_grad()
    def score_maps(self, x: torch.Tensor, recon: torch.Tensor, feature_net: Optional[nn.Module] = None,
                   channel: Optional[int] = None, ssim_sigma: float = SSIM_SIGMA,
                   ssim_range: float = SSIM_DATA_RANGE, parts: Optional[Sequence[str]] = None
                   ) -> Dict[str, torch.Tensor]:
        """Per-pixel maps (B, 1, H, W): "signed" = mean over channels of x - recon (positive: brighter than the
        pseudo-healthy image), "l1" = mean |x - recon|, "ssim" = 1 - local SSIM; with a `feature_net` (anything with
        `.features`) also "perceptual" (always from all channels). `channel` = use that channel only (e.g. the
        centre slice of a 2.5D input) instead of the channel mean. `parts` = compute only the maps of these names
        (default all)."""
        if recon.shape != x.shape:
            raise ValueError(f"recon shape {tuple(recon.shape)} differs from x shape {tuple(x.shape)}")
        if channel is None:
            maps = residual_maps(x, recon, ssim_sigma, ssim_range, parts)
        else:
            if not -x.shape[1] <= channel < x.shape[1]:
                raise ValueError(f"channel {channel} out of range for {x.shape[1]} channels")
            c = channel % x.shape[1]
            maps = residual_maps(x.narrow(1, c, 1), recon.narrow(1, c, 1), ssim_sigma, ssim_range, parts)
        if feature_net is not None and (parts is None or "perceptual" in parts):
            maps["perceptual"] = perceptual_map(feature_net, x, recon)
        return maps

    def extra_repr(self) -> str:
        return f"type={self.type_name!r}"

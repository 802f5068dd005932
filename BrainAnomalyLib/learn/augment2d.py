"""On-the-fly augmentation of slice batches for the 2D networks, from MONAI transforms.

Intensity (bias field, gamma contrast, scale, shift) changes brain pixels only: a pixel of a channel is brain when
the slice mask says so or when it differs from the background value (neighbouring slices in context channels reach
beyond the centre slice's mask). The affine (small rotation, scaling, translation) moves the image (bilinear), the
mask (nearest) and the background indicator (nearest) with one draw, and pixels that are background after it are
set to exactly the background value, so the background stays what it was (0 by default) and the mask stays on
the image.

Seeded: `reseed(...)` sets every transform's random state from a seed sequence, so a batch's augmentation depends
only on (seed, epoch, rank, batch index), not on which process or worker makes it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Tuple

import numpy as np
import torch


@dataclass
class Augment2DConfig:
    enabled: bool = True
    prob: float = 0.5  # chance of each transform, per slice
    rotate_deg: float = 6.0
    scale: float = 0.05  # relative, +-
    translate_px: float = 3.0
    bias_coeff: float = 0.3  # Legendre coefficients of the log bias field drawn from (0, bias_coeff)
    bias_degree: int = 3
    gamma: Tuple[float, float] = (0.8, 1.25)
    intensity_scale: float = 0.1  # x * (1 + U(-s, s))
    intensity_shift: float = 0.1  # x + U(-s, s) (units of the standardised image)
    background: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def _plain(t) -> torch.Tensor:
    """MONAI may return a MetaTensor; the engine wants plain tensors."""
    return t.as_tensor() if hasattr(t, "as_tensor") else torch.as_tensor(t)


class Augmenter2D:
    """Seeded augmentation of a batch (x (B, C, H, W) float, mask (B, 1, H, W) bool); numpy or torch in, same out."""

    def __init__(self, config: Augment2DConfig = None, seed: int = 0) -> None:
        from monai import transforms as T

        self.config = c = config or Augment2DConfig()
        p = float(c.prob)
        self.affine = T.RandAffine(prob=p, rotate_range=math.radians(c.rotate_deg), scale_range=c.scale,
                                   translate_range=c.translate_px, mode="bilinear", padding_mode="zeros")
        self.bias = T.RandBiasField(degree=c.bias_degree, coeff_range=(0.0, c.bias_coeff), prob=p)
        self.contrast = T.RandAdjustContrast(prob=p, gamma=tuple(c.gamma))
        self.scale = T.RandScaleIntensity(factors=c.intensity_scale, prob=p)
        self.shift = T.RandShiftIntensity(offsets=c.intensity_shift, prob=p)
        self.reseed(seed)

    def _transforms(self):
        return (self.affine, self.bias, self.contrast, self.scale, self.shift)

    def reseed(self, *keys: int) -> None:
        """Set every transform's random state from the integers `keys` (e.g. seed, epoch, rank, batch)."""
        states = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(len(self._transforms()))
        for t, s in zip(self._transforms(), states):
            t.set_random_state(seed=int(s))

    def __call__(self, x, mask):
        if not self.config.enabled:
            return x, mask
        as_numpy = isinstance(x, np.ndarray)
        xt = torch.as_tensor(x)
        mt = torch.as_tensor(mask)
        if xt.dim() != 4 or mt.dim() != 4 or mt.shape[1] != 1 or mt.shape[0] != xt.shape[0] \
                or mt.shape[2:] != xt.shape[2:]:
            raise ValueError(f"augmentation needs x (B, C, H, W) and mask (B, 1, H, W), got {tuple(xt.shape)} "
                             f"and {tuple(mt.shape)}")
        from monai.data import get_track_meta, set_track_meta

        previous = get_track_meta()
        set_track_meta(False)  # MetaTensor bookkeeping costs 4x the transform itself on slices this size
        try:
            pairs = [self._one(xt[i].float().cpu(), mt[i].bool().cpu()) for i in range(xt.shape[0])]
        finally:
            set_track_meta(previous)
        xo = torch.stack([p[0] for p in pairs]).to(xt.dtype)
        mo = torch.stack([p[1] for p in pairs])
        if as_numpy:
            return xo.numpy(), mo.numpy()
        return xo.to(xt.device), mo.to(mt.device)

    def _one(self, x: torch.Tensor, m: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        bg = float(self.config.background)
        brain = m | (x != bg)  # (C, H, W)
        if not bool(brain.any()):
            return x, m
        out = x
        lo = float(x[brain].min())
        out = _plain(self.bias(out - lo)) + lo  # the field multiplies a positive image
        out = _plain(self.contrast(out))
        out = _plain(self.scale(out))
        out = _plain(self.shift(out))
        out = torch.where(brain, out.float(), x)
        self.affine.randomize()
        if not self.affine._do_transform:
            return out, m
        warped = _plain(self.affine(out - bg, randomize=False)) + bg  # padding is background
        indicators = torch.cat([m, ~brain]).float()  # mask and per-channel background, one geometry
        moved = _plain(self.affine(indicators, mode="nearest", randomize=False)) > 0.5
        m_out, background = moved[:1], moved[1:]
        return torch.where(background, torch.full_like(warped, bg), warped), m_out

"""Coarse noise for the denoising autoencoder (Kascenas et al. 2022): Gaussian noise drawn on a low-resolution grid and
upsampled bilinearly, so it forms smooth blobs a few centimetres across, like a lesion, rather than pixel noise a
network could remove by smoothing."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def coarse_noise(shape: Sequence[int], res: Sequence[int], std: float, mask: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None, device=None, dtype=torch.float32,
                 shared_channels: bool = True) -> torch.Tensor:
    """Noise of `shape` (B, C, H, W).

    N(0, std^2) values on a (res[0] + 1) x (res[1] + 1) grid per slice are upsampled bilinearly at the scale that maps
    res cells onto (H, W), and a window of (H, W) is cropped at a random offset (so cell boundaries do not sit at the
    same pixels in every sample). Bilinear interpolation averages neighbouring draws, so the per-pixel standard
    deviation is about 2/3 of `std` on average. With `shared_channels` one field serves every channel (a blob
    through the neighbouring slices of a 2.5D input). Multiplied by `mask` (B, 1, H, W) when given: zero outside the
    brain. Uses `generator` (or torch's global RNG) for every random number.
    """
    b, c, h, w = (int(s) for s in shape)
    rh, rw = (int(r) for r in res)
    if rh < 1 or rw < 1 or rh > h or rw > w:
        raise ValueError(f"noise resolution {tuple(res)} must be between 1 and the slice size {(h, w)}")
    if device is None and mask is not None:
        device = mask.device
    cf = 1 if shared_channels else c
    low = torch.randn((b, cf, rh + 1, rw + 1), generator=generator, device=device, dtype=dtype) * std
    cell_h, cell_w = h / rh, w / rw
    big_h, big_w = int(round(h + cell_h)), int(round(w + cell_w))
    up = F.interpolate(low, size=(big_h, big_w), mode="bilinear", align_corners=False)
    oy = torch.randint(0, big_h - h + 1, (b,), generator=generator, device=device).tolist()
    ox = torch.randint(0, big_w - w + 1, (b,), generator=generator, device=device).tolist()
    noise = torch.stack([up[i, :, oy[i]:oy[i] + h, ox[i]:ox[i] + w] for i in range(b)])
    if shared_channels and c > 1:
        noise = noise.expand(b, c, h, w).contiguous()
    if mask is not None:
        noise = noise * mask.to(device=noise.device, dtype=noise.dtype)
    return noise

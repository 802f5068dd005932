"""Octave simplex noise for AnoDDPM (Wyatt et al. 2022), vectorised in torch.

Gaussian noise is white: a diffusion model that removes it learns to fix pixel-scale detail, and a lesion larger than
a few pixels survives partial noising almost untouched. Simplex noise summed over octaves has most of its power at
low spatial frequencies, so noising with it erases lesion-sized structure, and the denoiser learns to redraw healthy
tissue in its place.

Each field is a sum over `octaves` of 2D simplex noise (Perlin 2001, the skewed triangular lattice), the octave o at
frequency 2^o / scale (cycles per pixel, scale in pixels) with weight persistence^o, then standardised per field (per
sample and channel) to mean 0 and std 1, as the diffusion process assumes of its noise. Fields differ by random
offsets into the lattice (per field and octave) and a random gradient permutation per call, all drawn from the given
generator, so a seeded generator gives the same noise every time.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

_SKEW = 0.5 * (math.sqrt(3.0) - 1.0)
_UNSKEW = (3.0 - math.sqrt(3.0)) / 6.0
_N_GRADIENTS = 12
_LATTICE = 256  # the permutation table's period, in lattice cells
# The sum of the three corner kernels peaks near 1/70 for unit gradients: 70 brings a single octave to about [-1, 1].
_GAIN = 70.0


def _simplex2d(y: torch.Tensor, x: torch.Tensor, perm: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """Simplex noise at the points (y, x) (any equal shapes) for the permutation table `perm` (2 * _LATTICE,)."""
    s = (x + y) * _SKEW
    i = torch.floor(x + s)
    j = torch.floor(y + s)
    t = (i + j) * _UNSKEW
    x0 = x - (i - t)
    y0 = y - (j - t)
    # The cell is split along its diagonal: which triangle the point is in decides the middle corner.
    upper = (x0 > y0).to(x.dtype)
    i1, j1 = upper, 1.0 - upper
    corners = ((x0, y0, 0.0, 0.0), (x0 - i1 + _UNSKEW, y0 - j1 + _UNSKEW, i1, j1),
               (x0 - 1.0 + 2.0 * _UNSKEW, y0 - 1.0 + 2.0 * _UNSKEW, 1.0, 1.0))
    ii = torch.remainder(i, _LATTICE).long()
    jj = torch.remainder(j, _LATTICE).long()
    total = torch.zeros_like(x)
    for cx, cy, di, dj in corners:
        di_l = di.long() if isinstance(di, torch.Tensor) else int(di)
        dj_l = dj.long() if isinstance(dj, torch.Tensor) else int(dj)
        g = perm[ii + di_l + perm[jj + dj_l]] % _N_GRADIENTS
        gx, gy = grads[0][g], grads[1][g]
        falloff = (0.5 - cx * cx - cy * cy).clamp_min(0.0)
        total = total + falloff ** 4 * (gx * cx + gy * cy)
    return _GAIN * total


def simplex_noise(shape: Sequence[int], scale: float = 32.0, octaves: int = 5, persistence: float = 0.8,
                  generator: Optional[torch.Generator] = None, device=None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Noise of `shape` (B, C, H, W), every (b, c) field an independent octave simplex field with mean 0 and std 1
    (see the module docstring). `scale` = pixels per cycle of the coarsest octave. Random numbers come from
    `generator` (or torch's global RNG) on `device` (default: the generator's device, else the CPU)."""
    b, c, h, w = (int(s) for s in shape)
    if scale <= 0 or octaves < 1 or persistence <= 0:
        raise ValueError(f"simplex noise needs scale > 0, octaves >= 1, persistence > 0; got {scale}, {octaves}, "
                         f"{persistence}")
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    n = b * c
    perm = torch.randperm(_LATTICE, generator=generator, device=device)
    perm = torch.cat([perm, perm])
    # Offsets are whole lattice periods apart at most: any offset in [0, _LATTICE) gives an unrelated field.
    offsets = torch.rand((octaves, 2, n, 1, 1), generator=generator, device=device, dtype=torch.float64) * _LATTICE
    angles = torch.arange(_N_GRADIENTS, device=device, dtype=torch.float64) * (2.0 * math.pi / _N_GRADIENTS)
    grads = (torch.cos(angles), torch.sin(angles))
    ys = torch.arange(h, device=device, dtype=torch.float64).view(1, h, 1)
    xs = torch.arange(w, device=device, dtype=torch.float64).view(1, 1, w)
    field = torch.zeros((n, h, w), device=device, dtype=torch.float64)
    for o in range(octaves):
        f = (2.0 ** o) / float(scale)
        y = (ys * f + offsets[o, 0]).expand(n, h, w)
        x = (xs * f + offsets[o, 1]).expand(n, h, w)
        field = field + (persistence ** o) * _simplex2d(y, x, perm, grads)
    field = field - field.mean(dim=(1, 2), keepdim=True)
    field = field / field.std(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    return field.view(b, c, h, w).to(dtype)

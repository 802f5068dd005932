"""detection.postprocess's cleaning of a model-grid map in torch, for the CUDA path; the same results as scipy
(the median filter and the erosion are exact, the statistics equal to float rounding). Thresholding and the
connected components of the lesion table stay on the CPU (scipy), on the back-projected map."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..preprocess.torch_grid import quantiles
from ..core.template import Grid
from .postprocess import PostprocessConfig, small_lesion_weight


def _reflect_pad(x: torch.Tensor, dim: int, before: int, after: int) -> torch.Tensor:
    """scipy's 'reflect' border (d c b a | a b c d: the edge voxel repeated), which F.pad does not offer."""
    n = x.shape[dim]
    index = torch.arange(-before, n + after, device=x.device)
    index = torch.where(index < 0, -index - 1, index)
    index = torch.where(index >= n, 2 * n - 1 - index, index)
    return x.index_select(dim, index.clamp(0, n - 1))


def filter_map(anomaly_map: torch.Tensor, config: PostprocessConfig) -> torch.Tensor:
    """ndimage.median_filter(size=(1, s, s)): each axial slice's s x s median, rank s*s // 2 of the sorted window
    (the upper middle for an even window, as scipy takes it) and the window placed as scipy places it."""
    s = int(config.median_size)
    if s <= 1:
        return anomaly_map
    before, after = s // 2, s - 1 - s // 2
    x = _reflect_pad(_reflect_pad(anomaly_map, 1, before, after), 2, before, after)
    windows = x.unfold(1, s, 1).unfold(2, s, 1).reshape(*anomaly_map.shape, s * s)
    return windows.kthvalue(s * s // 2 + 1, dim=-1).values


def erode_mask(mask: torch.Tensor, config: PostprocessConfig, slab: Sequence[int] = (0, 0, 0)) -> torch.Tensor:
    """ndimage.binary_erosion with its default 6-neighbour cross, outside the volume counting as background; then
    along each axis by `slab` voxels (postprocess.erode_mask)."""
    out = mask.to(torch.bool)
    for _ in range(int(config.erode_voxels)):
        p = F.pad(out[None, None].to(torch.float32), (1, 1, 1, 1, 1, 1))[0, 0] > 0
        out = (out & p[:-2, 1:-1, 1:-1] & p[2:, 1:-1, 1:-1] & p[1:-1, :-2, 1:-1] & p[1:-1, 2:, 1:-1]
               & p[1:-1, 1:-1, :-2] & p[1:-1, 1:-1, 2:])
    for axis, k in enumerate(slab):
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = 1  # F.pad lists the last axis first
        for _ in range(int(k)):
            p = F.pad(out[None, None].to(torch.float32), pad)[0, 0] > 0
            out = out & p.narrow(axis, 0, out.shape[axis]) & p.narrow(axis, 2, out.shape[axis])
    return out


def clip_to_mask(filtered: torch.Tensor, eroded: torch.Tensor) -> torch.Tensor:
    return torch.where(eroded, filtered.clamp(min=0.0), torch.zeros((), device=filtered.device)).to(torch.float32)


def robust_stats(values: torch.Tensor) -> dict:
    if values.numel() == 0:
        return {"median": 0.0, "mad": 0.0}
    med = quantiles(values, (0.5,))[0]
    return {"median": med, "mad": 1.4826 * quantiles((values.to(torch.float32) - med).abs(), (0.5,))[0]}


def postprocess(anomaly_map: np.ndarray, mask: np.ndarray, config: PostprocessConfig, device: str,
                slab: Sequence[int] = (0, 0, 0), small_lesion_zone: Optional[np.ndarray] = None,
                acquisition_mm: Optional[Sequence[float]] = None, grid: Optional[Grid] = None):
    """(clean map, eroded mask, robust stats of the filtered map in it) as numpy, computed on `device`;
    `small_lesion_zone` (postprocess.small_lesion_zone) where the unfiltered map is kept too, less the margin
    for `acquisition_mm` on `grid` (postprocess.small_lesion_margin)."""
    m = torch.as_tensor(np.ascontiguousarray(anomaly_map, np.float32), device=device)
    filtered = filter_map(m, config)
    if small_lesion_zone is not None and small_lesion_zone.any():
        zone = torch.as_tensor(small_lesion_zone, device=device)
        raised = m
        if config.small_lesion_spread > 0:
            if grid is None:
                raise ValueError("the small-lesion margin needs the model grid")
            raised = m - small_lesion_weight(config, acquisition_mm, grid) * filter_map((m - filtered).abs(), config)
        filtered = torch.where(zone, torch.maximum(filtered, raised), filtered)
    eroded = erode_mask(torch.as_tensor(mask, device=device), config, slab)
    clean = clip_to_mask(filtered, eroded)
    return clean.cpu().numpy(), eroded.cpu().numpy(), robust_stats(filtered[eroded])

"""Resampling and intensity standardisation in torch, for the CUDA path (the CPU path keeps SimpleITK and numpy).

Geometry travels as 4x4 matrices in ITK index order (i, j, k), so the device needs no SimpleITK: an image's
index -> physical matrix, and the registration's template -> scan affine. Arrays are (k, j, i), as
sitk.GetArrayFromImage gives them, which is exactly grid_sample's (D, H, W) with its (x, y, z) = (i, j, k).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .normalise import MIN_TISSUE_VOXELS, TISSUE_PROBABILITY


def index_to_physical(origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float]) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = np.asarray(direction, np.float64).reshape(3, 3) @ np.diag(np.asarray(spacing, np.float64))
    out[:3, 3] = np.asarray(origin, np.float64)
    return out


def image_matrix(image) -> np.ndarray:
    """index_to_physical of a SimpleITK image (or anything with its three geometry getters)."""
    return index_to_physical(image.GetOrigin(), image.GetSpacing(), image.GetDirection())


def affine_matrix(transform) -> np.ndarray:
    """The 4x4 of a SimpleITK affine transform: p -> A (p - c) + c + t."""
    a = np.asarray(transform.GetMatrix(), np.float64).reshape(3, 3)
    c = np.asarray(transform.GetCenter(), np.float64)
    out = np.eye(4)
    out[:3, :3] = a
    out[:3, 3] = c + np.asarray(transform.GetTranslation(), np.float64) - a @ c
    return out


def _theta(index_map: np.ndarray, out_shape: Sequence[int], in_shape: Sequence[int]) -> torch.Tensor:
    """affine_grid's 3x4 for an output-index -> input-index map, with align_corners=True (index 0 <-> -1)."""
    def to_normal(shape):  # index (i, j, k) -> [-1, 1] per axis; shape is (k, j, i)
        n = np.eye(4)
        for axis, size in enumerate(reversed(shape)):
            n[axis, axis] = 2.0 / max(size - 1, 1)
            n[axis, 3] = -1.0
        return n

    theta = to_normal(in_shape) @ index_map @ np.linalg.inv(to_normal(out_shape))
    return torch.as_tensor(theta[:3], dtype=torch.float32)


def resample(volume: torch.Tensor, in_matrix: np.ndarray, out_matrix: np.ndarray, out_shape: Sequence[int],
             moving_from_fixed: np.ndarray, nearest: bool = False) -> torch.Tensor:
    """`volume` (k, j, i) with index -> physical `in_matrix`, sampled on the grid (`out_matrix`, `out_shape`)
    through `moving_from_fixed` (output physical point -> input physical point), as sitk.Resample does it:
    trilinear or nearest, 0 outside. Like ITK, a point counts as inside up to half a voxel beyond the edge
    centres (and takes the edge value there), so a brain touching the field of view ends where ITK ends it."""
    index_map = np.linalg.inv(in_matrix) @ moving_from_fixed @ out_matrix
    theta = _theta(index_map, out_shape, volume.shape).to(volume.device)
    # float64 would double the memory on a BraTS-size volume; float32 positions are exact to ~1e-5 voxel here.
    grid = F.affine_grid(theta[None], [1, 1, *out_shape], align_corners=True)
    src = volume[None, None].to(torch.float32)
    out = F.grid_sample(src, grid, mode="nearest" if nearest else "bilinear", padding_mode="border",
                        align_corners=True)[0, 0]
    half = torch.tensor([0.5 / max(s - 1, 1) * 2 for s in reversed(volume.shape)], device=volume.device)
    inside = (grid.abs() <= 1 + half).all(dim=-1)[0]
    return torch.where(inside, out, torch.zeros((), device=out.device))


def quantiles(values: torch.Tensor, q: Sequence[float]) -> list:
    """np.percentile's linear quantiles (q in 0..1), in float64 (torch.quantile refuses over 2**24 values, so by
    sorting)."""
    v = torch.sort(values.reshape(-1).to(torch.float64)).values
    n = v.numel()
    out = []
    for p in q:
        pos = p * (n - 1)
        lo = int(np.floor(pos))
        hi = min(lo + 1, n - 1)
        out.append(float(v[lo] + (v[hi] - v[lo]) * (pos - lo)))
    return out


def normalise(array: torch.Tensor, mask: torch.Tensor, method: str,
              tissue: Optional[dict] = None) -> tuple[torch.Tensor, dict]:
    """preprocess.normalise for TORCH_METHODS on the device: the same statistics (offset, scale), the same output
    (float32, outside the brain set to the darkest brain value) and the same errors."""
    inside = array[mask]
    if inside.numel() == 0:
        raise ValueError("empty brain mask")
    info: dict = {"method": method}
    if method == "median-iqr":
        p25, p50, p75 = quantiles(inside, (0.25, 0.5, 0.75))
        offset, scale = p50, max(p75 - p25, 1e-6 * max(abs(p50), 1.0))
        info.update(offset=offset, scale=scale)
    elif method == "percentile":
        p1, p99 = quantiles(inside, (0.01, 0.99))
        offset, scale = p1, max(p99 - p1, 1e-6)
        info.update(offset=offset, scale=scale)
    elif method == "tissue-peaks":
        if tissue is None:
            raise ValueError("tissue-peaks needs the template's WM and GM maps on the grid")
        peaks = {}
        for name, p in TISSUE_PROBABILITY.items():
            voxels = array[mask & (torch.as_tensor(tissue[name], device=array.device) >= p)]
            if voxels.numel() < MIN_TISSUE_VOXELS:
                raise ValueError(f"too few {name} voxels in the brain mask to find the tissue peak")
            peaks[name] = quantiles(voxels, (0.5,))[0]
        offset = peaks["GM"]
        scale = max(abs(peaks["WM"] - peaks["GM"]), 1e-6 * max(abs(peaks["GM"]), 1.0))
        info.update(offset=offset, scale=scale, wm_peak=peaks["WM"], gm_peak=peaks["GM"])
    else:
        raise ValueError(f"normalisation {method!r} has no torch version (normalise.TORCH_METHODS); it runs on numpy")
    # float32 arithmetic with the statistics as Python floats, as numpy does it: the same values to the last bit.
    out = (array.to(torch.float32) - offset) / scale
    return torch.where(mask, out, out[mask].min()), info


def normalise_array(array: np.ndarray, mask: np.ndarray, method: str, tissue: Optional[dict],
                    device: str) -> tuple[np.ndarray, dict]:
    """`normalise` of numpy arrays on `device`, the result back as numpy (the scorers take numpy)."""
    out, info = normalise(torch.as_tensor(array, device=device), torch.as_tensor(mask, device=device), method,
                          tissue)
    return out.cpu().numpy(), info


def onto_grid(stripped, mask: np.ndarray, transform, reference, device: str) -> tuple[np.ndarray, np.ndarray]:
    """The stripped scan (trilinear) and its brain mask (nearest) on the grid of `reference` through `transform`
    (template -> scan), as numpy: the CPU path's two sitk.Resample calls."""
    import SimpleITK as sitk

    in_m, out_m, move = image_matrix(stripped), image_matrix(reference), affine_matrix(transform)
    shape = tuple(int(s) for s in reversed(reference.GetSize()))
    raw = resample(torch.as_tensor(sitk.GetArrayFromImage(stripped), device=device), in_m, out_m, shape, move)
    grid_mask = resample(torch.as_tensor(mask.astype(np.uint8), device=device), in_m, out_m, shape, move,
                         nearest=True)
    return raw.cpu().numpy(), grid_mask.cpu().numpy() > 0


def back_to_native(array: np.ndarray, reference, transform, native, nearest: bool, device: str):
    """A grid array (on `reference`'s grid) onto the scan's own grid through the inverse of `transform`, as a
    SimpleITK image like chain.to_native's."""
    import SimpleITK as sitk

    shape = tuple(int(s) for s in reversed(native.GetSize()))
    out = resample(torch.as_tensor(np.ascontiguousarray(array, np.float32), device=device), image_matrix(reference),
                   image_matrix(native), shape, np.linalg.inv(affine_matrix(transform)), nearest)
    image = sitk.GetImageFromArray(out.cpu().numpy())
    image.CopyInformation(native)
    return image

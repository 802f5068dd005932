"""The bounding box of a mask's voxels, as slices: what every step that works on the brain alone cuts out."""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import numpy as np


def mask_box(mask: np.ndarray, margin: Union[int, Sequence[int]] = 0) -> Tuple[slice, ...]:
    """Slices of `mask`'s bounding box widened by `margin` voxels (one for all axes, or one per axis) and clipped to
    the array; empty slices where the mask is empty. Found from one projection per axis, not every voxel's
    coordinates."""
    margins = [int(margin)] * mask.ndim if np.isscalar(margin) else [int(m) for m in margin]
    box = []
    for axis, (m, n) in enumerate(zip(margins, mask.shape)):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if not hit.size:
            return tuple(slice(0, 0) for _ in mask.shape)
        box.append(slice(max(0, int(hit[0]) - m), min(n, int(hit[-1]) + 1 + m)))
    return tuple(box)

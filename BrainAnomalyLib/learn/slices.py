"""Axial slices of grid volumes for the 2D networks, and the way back.

Volumes are numpy arrays (z, y, x) with z the axial slice index (the grid is (80, 112, 96)). An axial slice becomes
an array (C, H, W) = (1 + 2 * context, y, x): the slice itself in the centre channel (index `context`) and its
`context` neighbours on each side as further channels, repeated at the ends of the volume. Masks are (1, H, W) bool
(the centre slice's brain).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np


def _check_volume(image: np.ndarray, mask: np.ndarray, context: int) -> Tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image)
    mask = np.asarray(mask)
    if image.ndim != 3:
        raise ValueError(f"volume must be (z, y, x), got shape {image.shape}")
    if mask.shape != image.shape:
        raise ValueError(f"mask shape {mask.shape} differs from image shape {image.shape}")
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    return image, mask.astype(bool, copy=False)


def _stack(image: np.ndarray, mask: np.ndarray, z: np.ndarray, context: int) -> Tuple[np.ndarray, np.ndarray]:
    offsets = np.arange(-context, context + 1)
    idx = np.clip(z[:, None] + offsets[None, :], 0, image.shape[0] - 1)  # (N, C): neighbours, edge-replicated
    x = image[idx].astype(np.float32, copy=False)  # (N, C, Y, X)
    m = mask[z][:, None]  # (N, 1, Y, X)
    return np.ascontiguousarray(x), np.ascontiguousarray(m)


def brain_fractions(mask: np.ndarray) -> np.ndarray:
    """Fraction of each axial slice (z) that is brain."""
    mask = np.asarray(mask, bool)
    return mask.reshape(mask.shape[0], -1).mean(axis=1)


def slices_from_volume(image: np.ndarray, mask: np.ndarray, context: int = 0,
                       min_brain_fraction: float = 0.05) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training slices of one volume: (x (N, C, H, W) float32, mask (N, 1, H, W) bool, z indices (N,) int64),
    keeping the axial slices whose brain fraction is at least `min_brain_fraction`."""
    image, mask = _check_volume(image, mask, context)
    z = np.flatnonzero(brain_fractions(mask) >= min_brain_fraction).astype(np.int64)
    x, m = _stack(image, mask, z, context)
    return x, m, z


def volume_slices_for_scoring(image: np.ndarray, mask: np.ndarray, context: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Every axial slice of a volume, in z order (no filtering): (x (Z, C, H, W), mask (Z, 1, H, W))."""
    image, mask = _check_volume(image, mask, context)
    return _stack(image, mask, np.arange(image.shape[0]), context)


def slices_to_volume(maps: np.ndarray, shape: Sequence[int], z_indices: Optional[Sequence[int]] = None,
                     fill: float = 0.0) -> np.ndarray:
    """Per-slice maps (N, H, W) or (N, 1, H, W) back into a (Z, Y, X) float32 volume. Without `z_indices` the maps
    are every slice in z order; with them, slices not named are `fill`."""
    maps = np.asarray(maps)
    if maps.ndim == 4:
        if maps.shape[1] != 1:
            raise ValueError(f"maps must have one channel, got shape {maps.shape}")
        maps = maps[:, 0]
    shape = tuple(int(s) for s in shape)
    if maps.ndim != 3 or len(shape) != 3 or maps.shape[1:] != shape[1:]:
        raise ValueError(f"maps of shape {maps.shape} do not fit a volume of shape {shape}")
    if z_indices is None:
        if maps.shape[0] != shape[0]:
            raise ValueError(f"{maps.shape[0]} maps for a volume of {shape[0]} slices (pass z_indices)")
        return maps.astype(np.float32)
    z = np.asarray(z_indices, np.int64)
    if z.shape != (maps.shape[0],) or (z.size and (z.min() < 0 or z.max() >= shape[0])):
        raise ValueError("z_indices must give one slice index in range per map")
    out = np.full(shape, fill, np.float32)
    out[z] = maps
    return out


def _subject_key(subject: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}\0{subject}".encode()).hexdigest()


def split_by_subject(subjects: Iterable[str], val_fraction: float = 0.1, seed: int = 0) -> Tuple[List[str], List[str]]:
    """(train subjects, validation subjects): disjoint, sorted, and stable across runs, machines and the order the
    subjects come in (subjects are ranked by a hash of seed and id). At least one subject stays in training; with
    two or more subjects and val_fraction > 0 at least one goes to validation."""
    unique = sorted({str(s) for s in subjects})
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n = len(unique)
    n_val = int(round(val_fraction * n))
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, max(n - 1, 0))
    ranked = sorted(unique, key=lambda s: _subject_key(s, seed))
    val = set(ranked[:n_val])
    return [s for s in unique if s not in val], sorted(val)


@dataclass
class SliceSet:
    """Slices of many volumes: x (N, C, H, W) float32, mask (N, 1, H, W) bool, and per slice its subject id and z."""

    x: np.ndarray
    mask: np.ndarray
    subjects: np.ndarray
    z: np.ndarray
    context: int = 0

    def __post_init__(self) -> None:
        n = self.x.shape[0]
        if not (self.mask.shape[0] == len(self.subjects) == len(self.z) == n):
            raise ValueError("x, mask, subjects and z must have one entry per slice")

    @classmethod
    def from_volumes(cls, volumes: Iterable[Tuple[str, np.ndarray, np.ndarray]], context: int = 0,
                     min_brain_fraction: float = 0.05) -> "SliceSet":
        """From (subject id, image, mask) volumes."""
        xs, ms, subs, zs = [], [], [], []
        for subject, image, mask in volumes:
            x, m, z = slices_from_volume(image, mask, context, min_brain_fraction)
            xs.append(x)
            ms.append(m)
            zs.append(z)
            subs.append(np.full(len(z), str(subject), dtype=object))
        if not xs:
            raise ValueError("no volumes")
        return cls(np.concatenate(xs), np.concatenate(ms), np.concatenate(subs), np.concatenate(zs), context)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def subject_ids(self) -> List[str]:
        return sorted({str(s) for s in self.subjects})

    def arrays(self) -> Tuple[np.ndarray, np.ndarray]:
        """(x, mask), as fit_net takes them."""
        return self.x, self.mask

    def select(self, subject_ids: Iterable[str]) -> "SliceSet":
        keep = np.isin(self.subjects.astype(str), np.asarray(sorted({str(s) for s in subject_ids}), dtype=str))
        return SliceSet(self.x[keep], self.mask[keep], self.subjects[keep], self.z[keep], self.context)

    def split(self, val_fraction: float = 0.1, seed: int = 0) -> Tuple["SliceSet", "SliceSet"]:
        """(train, validation) by subject (split_by_subject)."""
        train_ids, val_ids = split_by_subject(self.subject_ids, val_fraction, seed)
        return self.select(train_ids), self.select(val_ids)

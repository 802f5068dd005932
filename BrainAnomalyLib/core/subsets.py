"""Evenly spread subsets of indices: one rule for every place that shows or measures a part of a set of slices."""

from __future__ import annotations

import numpy as np


def spread_pick(n_total: int, n: int) -> np.ndarray:
    """min(n, n_total) indices evenly spaced over range(n_total), first and last included: a subset of slices that
    covers the whole brain (or set) rather than its first n."""
    return np.unique(np.linspace(0, n_total - 1, min(n, n_total)).round().astype(np.int64))

import numpy as np
import pytest

from BrainAnomalyLib.core.box import mask_box


def _reference(mask, margins):
    idx = np.argwhere(mask)
    lo = np.maximum(idx.min(axis=0) - margins, 0)
    hi = np.minimum(idx.max(axis=0) + 1 + margins, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


@pytest.mark.parametrize("margin", [0, 1, 4, (2, 0, 7)])
def test_the_box_is_the_voxels_extent_widened_and_clipped(margin):
    rng = np.random.default_rng(3)
    for _ in range(20):
        mask = np.zeros((9, 12, 15), bool)
        mask[tuple(rng.integers(0, n, size=4) for n in mask.shape)] = True
        margins = np.broadcast_to(np.asarray(margin), 3)
        assert mask_box(mask, margin) == _reference(mask, margins)
        assert mask[mask_box(mask, margin)].sum() == mask.sum()


def test_an_empty_mask_gives_empty_slices():
    box = mask_box(np.zeros((4, 5, 6), bool), 3)
    assert box == (slice(0, 0),) * 3
    assert np.zeros((4, 5, 6))[box].size == 0

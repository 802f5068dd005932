"""A model's healthy calibration record, from the cleaned scores of held-out healthy scans."""

from __future__ import annotations

from typing import List, Sequence

import numpy as np

from .adaptive import AdaptiveReference
from .curve import DEFAULT_FPRS, calibration_tables

METHOD = "pooled healthy voxel quantiles over the whole grid brain mask"


class HealthyPool:
    """Healthy scans' cleaned scores over the whole grid brain mask and their robust statistics, one scan at a
    time; `calibration` turns them into the model's `calibration` record.

    The pool is the cleaned map over the whole grid brain mask: voxels the erosion removed score 0 and count as
    healthy voxels that are never flagged, so "1 % FPR" means 1 % of the brain, as a user reads it and as the
    evaluation measures it."""

    def __init__(self) -> None:
        self.values: List[np.ndarray] = []
        self.stats: List[dict] = []
        self.subjects: set = set()

    def add(self, subject: str, values: np.ndarray, stats: dict) -> None:
        """One scan: its cleaned scores inside the grid brain mask, and the robust statistics of its scores."""
        self.values.append(values)
        self.stats.append(stats)
        self.subjects.add(subject)

    def calibration(self, fprs: Sequence[float] = DEFAULT_FPRS, skipped: Sequence[str] = ()) -> dict:
        """The table at `fprs`, the dense curve and the scan-adaptive reference, with what they were measured on.
        ValueError when no scan was added (naming the `skipped` ones) or for an FPR outside (0, 1)."""
        if not self.values:
            raise ValueError("no usable healthy scans to calibrate on" + (": " + "; ".join(skipped) if skipped else ""))
        reference = AdaptiveReference.from_stats(self.stats)
        return {"method": METHOD, **calibration_tables(self.values, fprs), "n_scans": len(self.values),
                "n_voxels": int(sum(v.size for v in self.values)), "subjects": sorted(self.subjects),
                "skipped": list(skipped), "adaptive": reference.to_dict() if reference else None}

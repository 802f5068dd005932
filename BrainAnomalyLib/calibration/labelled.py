"""The labelled refinement: a threshold chosen on a few labelled lesion cases, stored beside the healthy
calibration (never instead of it: detection keeps defaulting to the label-free 1 % threshold)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .curve import CalibrationCurve

METHOD = "best pooled Dice over labelled cases (native grid, within the brain mask)"


def labelled_refinement(dice: float, at: float, subjects: Sequence[str], skipped: Sequence[str],
                        lesion_voxels: int, brain_voxels: int) -> dict:
    """The refinement record from the best pooled Dice `dice` over the cases of `subjects`, reached by flagging
    scores >= `at` (evaluation.metrics.best_dice)."""
    # Detection flags scores > threshold: one float32 step below `at` flags the same voxels of a float32 map.
    value = float(np.nextafter(np.float32(at), np.float32(-np.inf)))
    return {"threshold": value, "dice": round(float(dice), 4), "n_cases": len(subjects),
            "subjects": sorted(set(subjects)), "skipped": list(skipped), "lesion_voxels": int(lesion_voxels),
            "brain_voxels": int(brain_voxels), "method": METHOD}


def with_labelled(calibration: dict, labelled: Optional[dict] = None, previous: Optional[dict] = None) -> dict:
    """A new healthy `calibration` record with its labelled refinement: `labelled` when given, else the model's
    `previous` one, whose raw threshold stays valid (only what it means on healthy scans changed). Its
    `healthy_fpr` is read on the new curve. Changes and returns `calibration`."""
    if labelled is None and previous and previous.get("threshold") is not None:
        labelled = dict(previous)
    if labelled is not None:
        curve = CalibrationCurve.from_calibration(calibration)
        labelled["healthy_fpr"] = curve.fpr(labelled["threshold"]) if curve is not None else None
        calibration["labelled"] = labelled
    return calibration

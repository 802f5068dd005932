"""Voxel-level metrics over pooled voxels, exact under ties (every distinct score is one threshold); detection
metrics over labelled findings and ground-truth components (the labelling itself happens in evaluate.py)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def descending_order(scores) -> np.ndarray:
    """The order that sorts `scores` highest first (what the curves below sort by; scores already in runs sorted
    that way, such as several scans' sorted maps one after the other, sort several times faster)."""
    return np.argsort(-np.asarray(scores, np.float64).ravel(), kind="stable")


def _curve(scores: np.ndarray, labels: np.ndarray, order=None):
    """(true positives, false positives, thresholds) at each distinct score, highest first. `order`: one that
    sorts the scores highest first, if known (checked; it may be that of other scores that rank the same, e.g. an
    increasing function of these): within a run of equal scores the order changes nothing."""
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels, bool).ravel()
    s = None if order is None else scores[order]
    if s is None or not np.all(s[:-1] >= s[1:]):
        order = descending_order(scores)
        s = scores[order]
    y = labels[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], s.size - 1] if s.size else np.array([], int)
    tps = np.cumsum(y)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return tps, fps, s[last_of_tie]


def average_precision(scores, labels, order=None) -> float:
    """Area under the precision-recall curve as a step sum (sklearn's average_precision_score); 0 if no positives.
    `order`: as _curve takes it."""
    return _average_precision(*_curve(scores, labels, order))


def _average_precision(tps, fps, _thresholds) -> float:
    positives = tps[-1] if tps.size else 0
    if positives == 0:
        return 0.0
    precision = tps / (tps + fps)
    recall = tps / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def intensity_ranking(values: np.ndarray, brain: np.ndarray, sign: float) -> np.ndarray:
    """A scan's own intensities as an anomaly score with no model (`sign` -1 where the lesions are dark), in its
    brain's robust units (median, IQR) so that scans can be pooled: whether the lesions stand out of the scan at
    all (scripts/robustness_flair.py --raw, scripts/raw_ceiling.py)."""
    q25, q50, q75 = np.percentile(values[brain], [25, 50, 75])
    return (sign * (values.astype(np.float32) - q50) / max(float(q75 - q25), 1e-6)).astype(np.float32)


def best_dice(scores, labels) -> tuple[float, float]:
    """Upper bound on Dice over all thresholds, and the threshold that reaches it ((0, inf) with no positives)."""
    return _best_dice(*_curve(scores, labels))


def _best_dice(tps, fps, thresholds) -> tuple[float, float]:
    positives = tps[-1] if tps.size else 0
    if positives == 0:
        return 0.0, float("inf")
    dice = 2 * tps / (tps + fps + positives)
    i = int(np.argmax(dice))
    return float(dice[i]), float(thresholds[i])


def dice(pred, truth) -> float:
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    total = pred.sum() + truth.sum()
    return 1.0 if total == 0 else float(2 * np.logical_and(pred, truth).sum() / total)


def roc_auc(scores, labels) -> float:
    """Area under the ROC curve (ties count half); NaN when only one class is present."""
    return _roc_auc(*_curve(scores, labels))


def _roc_auc(tps, fps, _thresholds) -> float:
    if not tps.size or tps[-1] == 0 or fps[-1] == 0:
        return float("nan")
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def pr_curve(scores, labels, max_points: int = 400):
    """(recall, precision) along thresholds, thinned to at most `max_points` for plotting."""
    return _pr_curve(*_curve(scores, labels), max_points=max_points)


def _pr_curve(tps, fps, _thresholds, max_points: int = 400):
    if not tps.size or tps[-1] == 0:
        return np.array([0.0]), np.array([0.0])
    recall, precision = tps / tps[-1], tps / (tps + fps)
    keep = np.unique(np.linspace(0, recall.size - 1, min(max_points, recall.size)).round().astype(int))
    return recall[keep], precision[keep]


def voxel_curve_metrics(scores, labels, order=None) -> dict:
    """average_precision, roc_auc, best_dice and pr_curve of one pooled set from one sort of the scores (a cohort's
    pooled brain voxels are tens of millions: the sort is most of an evaluation's summary). `order`: as _curve
    takes it."""
    c = _curve(scores, labels, order)
    bd, bt = _best_dice(*c)
    return {"auprc": _average_precision(*c), "auroc": _roc_auc(*c), "best_dice": bd, "best_dice_threshold": bt,
            "pr_curve": _pr_curve(*c)}


HIT_RULE = "a finding hits a ground-truth object when they share at least one voxel"


def finding_match(findings, truth_components, truth_sizes=None) -> dict:
    """Which findings hit which ground-truth objects, for one scan.

    `findings`: labelled findings (0 = none, any positive number = one finding); `truth_components`: labelled
    ground-truth components 1..m of the same shape. `truth_sizes` (voxels of components 1..m) is given when the
    arrays are a crop of the scan, so the count of objects and the largest one refer to the whole mask.

    Hit rule (HIT_RULE): a finding and an object hit each other when they share at least one voxel. Overlap, not
    "the finding's peak lies in the object", because it makes every finding either a hit or a false finding (a
    finding that touches no ground-truth voxel) with nothing in between, and it is the rule the lesion-level
    sensitivity already used; a peak on the back-projected map also sits at the mercy of interpolation and of the
    median filter by a voxel or two, which would flip hits on small or thin objects.

    The patient's lesion is taken two ways: all of the ground truth as one object (`patient_found`: any finding
    hits any component) and its largest connected component (`largest_found`; on a tie in size, the component
    numbered first). Both are None when the scan has no ground truth.
    """
    findings = np.asarray(findings)
    truth = np.asarray(truth_components)
    if findings.shape != truth.shape:
        raise ValueError(f"findings {findings.shape} and ground truth {truth.shape} differ in shape")
    sizes = (np.bincount(truth.ravel().astype(np.int64))[1:] if truth_sizes is None
             else np.asarray(truth_sizes, np.int64).ravel())
    both = (findings > 0) & (truth > 0)
    found = np.unique(truth[both])
    n_findings = np.unique(findings[findings > 0]).size
    n_hit = np.unique(findings[both]).size
    n_true = int(np.count_nonzero(sizes))
    largest = int(np.argmax(sizes)) + 1 if n_true else None
    return {"findings": int(n_findings), "false_findings": int(n_findings - n_hit), "true_lesions": n_true,
            "found": int(found.size), "patient_found": bool(found.size) if n_true else None,
            "largest_found": bool(np.isin(largest, found)) if n_true else None}


def detection_summary(matches: Sequence[dict], healthy: Sequence[bool]) -> dict:
    """Cohort detection metrics from per-scan `finding_match` results; `healthy[i]`: scan i came without a mask
    (the --healthy scans), so its findings are all false. Lesion scans whose mask is empty count for false
    findings per lesion scan but not in the patient rates. Rates are None where nothing is there to divide."""
    if len(matches) != len(healthy):
        raise ValueError("one healthy flag per scan")
    lesion = [m for m, h in zip(matches, healthy) if not h]
    patients = [m for m in lesion if m["true_lesions"]]
    healthy_ff = [m["false_findings"] for m, h in zip(matches, healthy) if h]
    true_lesions = sum(m["true_lesions"] for m in lesion)
    found = sum(m["found"] for m in lesion)

    def rate(num, den):
        return num / den if den else None

    return {"patients": len(patients),
            "patients_found": sum(bool(m["patient_found"]) for m in patients),
            "patient_rate": rate(sum(bool(m["patient_found"]) for m in patients), len(patients)),
            "largest_found": sum(bool(m["largest_found"]) for m in patients),
            "largest_rate": rate(sum(bool(m["largest_found"]) for m in patients), len(patients)),
            "true_lesions": true_lesions, "found": found, "lesion_sensitivity": rate(found, true_lesions),
            "false_findings_per_healthy_scan": rate(sum(healthy_ff), len(healthy_ff)),
            "false_findings_per_lesion_scan": rate(sum(m["false_findings"] for m in lesion), len(lesion)),
            "false_findings_per_scan": rate(sum(m["false_findings"] for m in matches), len(matches))}


def sweep_thresholds(values, top_fractions: Sequence[float], extra: Sequence[float] = ()) -> np.ndarray:
    """Thresholds for a FROC sweep, highest first: the score above which each fraction of `values` lies, plus
    `extra` (e.g. the calibrated threshold), duplicates merged."""
    values = np.asarray(values, np.float64).ravel()
    cuts = list(extra)
    if values.size:
        cuts += list(np.quantile(values, 1 - np.asarray(top_fractions, np.float64)))
    return np.unique(np.asarray(cuts, np.float64))[::-1]


def froc(thresholds, per_scan: Sequence[Sequence[dict]], healthy: Sequence[bool]) -> dict:
    """FROC-style curve: `per_scan[i][k]` is scan i's `finding_match` at `thresholds[k]`; returns, per threshold,
    the `detection_summary` fields as lists (patient and lesion sensitivity against false findings per scan)."""
    thresholds = [float(t) for t in thresholds]
    if any(len(s) != len(thresholds) for s in per_scan):
        raise ValueError("one match per scan and threshold")
    points = [detection_summary([s[k] for s in per_scan], healthy) for k in range(len(thresholds))]
    keys = points[0].keys() if points else detection_summary([], []).keys()
    return {"threshold": thresholds, **{key: [p[key] for p in points] for key in keys}}


def lesion_detection(pred, truth) -> dict:
    """Lesion-level counts: a true lesion is found when any predicted voxel touches it; a predicted component
    touching no true lesion is a false-positive lesion (26-connected components on both sides)."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(3, 3)
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    t_lab, _ = ndimage.label(truth, structure)
    p_lab, _ = ndimage.label(pred, structure)
    m = finding_match(p_lab, t_lab)
    return {"true_lesions": m["true_lesions"], "found": m["found"], "pred_lesions": m["findings"],
            "fp_lesions": m["false_findings"]}

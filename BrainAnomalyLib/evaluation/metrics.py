"""Voxel-level metrics over pooled voxels, exact under ties (every distinct score is one threshold)."""

from __future__ import annotations

import numpy as np


def _curve(scores: np.ndarray, labels: np.ndarray):
    """(true positives, false positives, thresholds) at each distinct score, highest first."""
    scores = np.asarray(scores, np.float64).ravel()
    labels = np.asarray(labels, bool).ravel()
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], s.size - 1] if s.size else np.array([], int)
    tps = np.cumsum(y)[last_of_tie]
    fps = (last_of_tie + 1) - tps
    return tps, fps, s[last_of_tie]


def average_precision(scores, labels) -> float:
    """Area under the precision-recall curve as a step sum (sklearn's average_precision_score); 0 if no positives."""
    tps, fps, _ = _curve(scores, labels)
    positives = tps[-1] if tps.size else 0
    if positives == 0:
        return 0.0
    precision = tps / (tps + fps)
    recall = tps / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def best_dice(scores, labels) -> tuple[float, float]:
    """Upper bound on Dice over all thresholds, and the threshold that reaches it ((0, inf) with no positives)."""
    tps, fps, thresholds = _curve(scores, labels)
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
    tps, fps, _ = _curve(scores, labels)
    if not tps.size or tps[-1] == 0 or fps[-1] == 0:
        return float("nan")
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def pr_curve(scores, labels, max_points: int = 400):
    """(recall, precision) along thresholds, thinned to at most `max_points` for plotting."""
    tps, fps, _ = _curve(scores, labels)
    if not tps.size or tps[-1] == 0:
        return np.array([0.0]), np.array([0.0])
    recall, precision = tps / tps[-1], tps / (tps + fps)
    keep = np.unique(np.linspace(0, recall.size - 1, min(max_points, recall.size)).round().astype(int))
    return recall[keep], precision[keep]


def lesion_detection(pred, truth) -> dict:
    """Lesion-level counts: a true lesion is found when any predicted voxel touches it; a predicted component
    touching no true lesion is a false-positive lesion (26-connected components on both sides)."""
    from scipy import ndimage

    structure = ndimage.generate_binary_structure(3, 3)
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    t_lab, n_true = ndimage.label(truth, structure)
    p_lab, n_pred = ndimage.label(pred, structure)
    found = np.unique(t_lab[pred & truth])
    hit_pred = np.unique(p_lab[pred & truth])
    return {"true_lesions": int(n_true), "found": int(np.count_nonzero(found)), "pred_lesions": int(n_pred),
            "fp_lesions": int(n_pred - np.count_nonzero(hit_pred))}

"""Metrics against hand-computed values, ties and degenerate cases included."""

import numpy as np
import pytest

from BrainAnomalyLib.evaluation.metrics import average_precision, best_dice, dice


def test_average_precision_hand_computed():
    # ranking: 0.9(+) 0.8(-) 0.7(+) 0.1(-): precision at the positives 1 and 2/3 -> AP = (1 + 2/3) / 2
    assert average_precision([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) == pytest.approx(5 / 6)


def test_average_precision_with_ties_counts_the_tie_as_one_threshold():
    # all four tied: one threshold, precision 0.5 at recall 1
    assert average_precision([0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0]) == pytest.approx(0.5)
    # tie between a positive and a negative at the top: precision 1/2 at recall 1/2, then 2/3 at recall 1
    assert average_precision([0.9, 0.9, 0.3, 0.2], [1, 0, 1, 0]) == pytest.approx(0.5 * 0.5 + 0.5 * 2 / 3)


def test_perfect_and_no_positive_cases():
    assert average_precision([0.9, 0.1], [1, 0]) == 1.0
    assert average_precision([0.9, 0.1], [0, 0]) == 0.0
    assert best_dice([0.9, 0.1], [0, 0]) == (0.0, float("inf"))


def test_best_dice_hand_computed():
    d, t = best_dice([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0])
    # threshold 0.7 -> TP 2, FP 1, FN 0 -> 4/5; threshold 0.9 -> TP 1, FN 1 -> 2/3
    assert d == pytest.approx(0.8) and t == 0.7


def test_dice_of_masks_including_empty():
    assert dice([1, 1, 0, 0], [1, 0, 1, 0]) == 0.5
    assert dice([0, 0], [0, 0]) == 1.0
    assert dice([1, 0], [0, 0]) == 0.0


def test_average_precision_matches_a_brute_force_definition():
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 20, 300).astype(float)  # many ties
    labels = rng.random(300) < 0.3
    ap = 0.0
    prev_recall = 0.0
    for t in np.unique(scores)[::-1]:
        pred = scores >= t
        tp = (pred & labels).sum()
        recall = tp / labels.sum()
        ap += (recall - prev_recall) * tp / pred.sum()
        prev_recall = recall
    assert average_precision(scores, labels) == pytest.approx(ap)


def test_roc_auc_hand_computed_with_ties():
    from BrainAnomalyLib.evaluation.metrics import roc_auc

    assert roc_auc([0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]) == pytest.approx(0.75)  # 3 of 4 pairs ordered
    assert roc_auc([0.5, 0.5], [1, 0]) == pytest.approx(0.5)  # a tie counts half
    assert np.isnan(roc_auc([0.3, 0.2], [0, 0]))


def test_roc_auc_matches_pairwise_definition():
    from BrainAnomalyLib.evaluation.metrics import roc_auc

    rng = np.random.default_rng(4)
    s = rng.integers(0, 10, 200).astype(float)
    y = rng.random(200) < 0.4
    pos, neg = s[y], s[~y]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert roc_auc(s, y) == pytest.approx(pairs)


def test_lesion_detection_counts():
    from BrainAnomalyLib.evaluation.metrics import lesion_detection

    truth = np.zeros((20, 20, 20), bool)
    truth[2:5, 2:5, 2:5] = True  # found
    truth[10:12, 10:12, 10:12] = True  # missed
    pred = np.zeros_like(truth)
    pred[4:7, 4:7, 4:7] = True  # touches the first
    pred[15:17, 15:17, 15:17] = True  # false positive
    assert lesion_detection(pred, truth) == {"true_lesions": 2, "found": 1, "pred_lesions": 2, "fp_lesions": 1}
    empty = lesion_detection(np.zeros_like(truth), np.zeros_like(truth))
    assert empty == {"true_lesions": 0, "found": 0, "pred_lesions": 0, "fp_lesions": 0}


def test_empty_prediction_and_all_negative_scan():
    from BrainAnomalyLib.evaluation.metrics import lesion_detection, roc_auc

    truth = np.zeros((10, 10, 10), bool)
    truth[2:4, 2:4, 2:4] = True
    empty = np.zeros_like(truth)
    assert dice(empty, truth) == 0.0
    assert lesion_detection(empty, truth) == {"true_lesions": 1, "found": 0, "pred_lesions": 0, "fp_lesions": 0}
    # an all-negative scan: every predicted component is a false positive, AP/AUROC are undefined-as-zero/NaN
    assert lesion_detection(truth, empty)["fp_lesions"] == 1
    scores = np.random.default_rng(0).random(1000)
    assert average_precision(scores, empty.ravel()) == 0.0
    assert np.isnan(roc_auc(scores, empty.ravel()))
    # constant scores (an empty heatmap) rank nothing: AP equals the prevalence
    labels = truth.ravel()
    assert average_precision(np.zeros(labels.size), labels) == pytest.approx(labels.mean())

"""Metrics against hand-computed values, ties and degenerate cases included."""

import numpy as np
import pytest

from BrainAnomalyLib.evaluation.metrics import (average_precision, best_dice, descending_order, dice, pr_curve, roc_auc,
                                                voxel_curve_metrics)


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


def _three_part_tumour():
    """Ground truth in three components: 216, 27 and 8 voxels (numbered largest first)."""
    truth = np.zeros((30, 30, 30), np.int32)
    truth[2:8, 2:8, 2:8] = 1
    truth[12:15, 2:5, 2:5] = 2
    truth[20:22, 20:22, 20:22] = 3
    return truth


def test_a_tumour_in_three_parts_found_by_one_finding():
    from BrainAnomalyLib.evaluation.metrics import detection_summary, finding_match

    truth = _three_part_tumour()
    findings = np.zeros_like(truth)
    findings[13:17, 3:6, 3:6] = 1  # overlaps the middle-sized part only
    m = finding_match(findings, truth)
    assert m == {"findings": 1, "false_findings": 0, "true_lesions": 3, "found": 1, "patient_found": True,
                 "largest_found": False}
    s = detection_summary([m], [False])
    assert s["patient_rate"] == 1.0 and s["largest_rate"] == 0.0
    assert s["lesion_sensitivity"] == pytest.approx(1 / 3)
    findings[5:7, 5:7, 5:7] = 2  # now also on the largest part
    assert finding_match(findings, truth)["largest_found"] is True


def test_one_finding_over_two_parts_and_two_findings_on_one_part():
    from BrainAnomalyLib.evaluation.metrics import finding_match

    truth = _three_part_tumour()
    findings = np.zeros_like(truth)
    findings[6:14, 3:4, 3:4] = 7  # a bridge touching parts 1 and 2; labels need not be consecutive
    findings[20, 20, 20] = 9
    findings[21, 21, 21] = 4  # two findings on part 3
    m = finding_match(findings, truth)
    assert (m["findings"], m["found"], m["false_findings"]) == (3, 3, 0)


def test_false_findings_counted_separately_for_healthy_and_lesion_scans():
    from BrainAnomalyLib.evaluation.metrics import detection_summary, finding_match

    truth = _three_part_tumour()
    lesion_findings = np.zeros_like(truth)
    lesion_findings[3, 3, 3] = 1  # a hit
    lesion_findings[25:28, 25:28, 2:4] = 2  # in healthy tissue: false
    healthy_findings = np.zeros_like(truth)
    healthy_findings[1:3, 20:22, 20:22] = 1
    healthy_findings[10, 10, 25] = 2
    no_truth = np.zeros_like(truth)
    lesion = finding_match(lesion_findings, truth)
    healthy = finding_match(healthy_findings, no_truth)
    assert lesion["false_findings"] == 1 and lesion["patient_found"] is True
    assert healthy == {"findings": 2, "false_findings": 2, "true_lesions": 0, "found": 0, "patient_found": None,
                       "largest_found": None}
    s = detection_summary([lesion, healthy, healthy], [False, True, True])
    assert s["false_findings_per_healthy_scan"] == 2.0 and s["false_findings_per_lesion_scan"] == 1.0
    assert s["false_findings_per_scan"] == pytest.approx(5 / 3)
    assert (s["patients"], s["patients_found"], s["true_lesions"], s["found"]) == (1, 1, 3, 1)


def test_detection_edge_cases_no_findings_no_truth():
    from BrainAnomalyLib.evaluation.metrics import detection_summary, finding_match

    truth = _three_part_tumour()
    empty = np.zeros_like(truth)
    missed = finding_match(empty, truth)
    assert missed == {"findings": 0, "false_findings": 0, "true_lesions": 3, "found": 0, "patient_found": False,
                      "largest_found": False}
    nothing = finding_match(empty, empty)
    assert nothing["patient_found"] is None and nothing["false_findings"] == 0
    # a lesion scan whose mask is empty counts for false findings per lesion scan, not in the patient rates
    s = detection_summary([missed, nothing], [False, False])
    assert s["patients"] == 1 and s["patient_rate"] == 0.0 and s["false_findings_per_lesion_scan"] == 0.0
    assert s["false_findings_per_healthy_scan"] is None
    none = detection_summary([], [])
    assert none["patient_rate"] is None and none["lesion_sensitivity"] is None
    assert none["false_findings_per_scan"] is None
    with pytest.raises(ValueError):
        finding_match(empty, empty[:2])


def test_truth_sizes_name_the_largest_component_of_the_whole_mask():
    """In a crop the largest component may be cut off or absent; the sizes of the whole mask decide."""
    from BrainAnomalyLib.evaluation.metrics import finding_match

    truth = _three_part_tumour()
    crop = truth[10:30]  # part 1 (the largest) lies outside
    findings = np.zeros_like(crop)
    findings[3, 3, 3] = 1  # on part 2
    m = finding_match(findings, crop, truth_sizes=[216, 27, 8])
    assert (m["true_lesions"], m["found"], m["largest_found"]) == (3, 1, False)
    assert finding_match(findings, crop)["largest_found"] is True  # without sizes only the crop is known
    # a tie in size: the component numbered first is the largest
    tie = np.zeros((10, 10, 10), np.int32)
    tie[1, 1, 1], tie[8, 8, 8] = 1, 2
    hit_second = np.zeros_like(tie)
    hit_second[8, 8, 8] = 1
    assert finding_match(hit_second, tie)["largest_found"] is False


def test_sweep_thresholds_and_froc_lists():
    from BrainAnomalyLib.evaluation.metrics import finding_match, froc, sweep_thresholds

    t = sweep_thresholds(np.arange(100.0), (0.1, 0.5), extra=[42.0, 49.5])
    assert t.tolist() == pytest.approx([89.1, 49.5, 42.0])
    truth = _three_part_tumour()
    hit = np.zeros_like(truth)
    hit[3, 3, 3] = 1
    false = np.zeros_like(truth)
    false[28, 28, 28] = 1
    empty = np.zeros_like(truth)
    per_scan = [[finding_match(empty, truth), finding_match(hit, truth)],
                [finding_match(empty, empty), finding_match(false, empty)]]
    curve = froc([2.0, 1.0], per_scan, [False, True])
    assert curve["threshold"] == [2.0, 1.0]
    assert curve["patient_rate"] == [0.0, 1.0] and curve["largest_rate"] == [0.0, 1.0]
    assert curve["lesion_sensitivity"] == pytest.approx([0.0, 1 / 3])
    assert curve["false_findings_per_healthy_scan"] == [0.0, 1.0]
    assert curve["false_findings_per_lesion_scan"] == [0.0, 0.0]
    with pytest.raises(ValueError):
        froc([2.0, 1.0], [per_scan[0][:1]], [False])


def test_the_one_sort_summary_equals_each_metric_on_its_own():
    from BrainAnomalyLib.evaluation.metrics import voxel_curve_metrics

    rng = np.random.default_rng(3)
    scores = np.round(rng.normal(size=20000), 2)  # many ties
    labels = rng.random(scores.size) < 0.05 + 0.3 * (scores > 1)
    v = voxel_curve_metrics(scores, labels)
    assert v["auprc"] == average_precision(scores, labels) and v["auroc"] == roc_auc(scores, labels)
    assert (v["best_dice"], v["best_dice_threshold"]) == best_dice(scores, labels)
    assert all(np.array_equal(a, b) for a, b in zip(v["pr_curve"], pr_curve(scores, labels)))
    assert 0.0 < v["auprc"] < 1.0 and v["auroc"] > 0.6


def test_a_known_order_gives_the_same_curves_and_a_wrong_one_is_not_taken():
    rng = np.random.default_rng(3)
    # three scans' maps, each sorted highest first on its own (as evaluation keeps them), with ties
    runs = [np.round(rng.standard_normal(n), 1) for n in (500, 80, 1200)]
    labels = [rng.random(r.size) < 0.2 for r in runs]
    order = [descending_order(r) for r in runs]
    scores = np.concatenate([r[o] for r, o in zip(runs, order)])
    y = np.concatenate([lab[o] for lab, o in zip(labels, order)])
    plain = voxel_curve_metrics(np.concatenate(runs), np.concatenate(labels))
    given = voxel_curve_metrics(scores, y, descending_order(scores))
    assert {k: v for k, v in plain.items() if k != "pr_curve"} == {k: v for k, v in given.items() if k != "pr_curve"}
    for a, b in zip(plain["pr_curve"], given["pr_curve"]):
        np.testing.assert_array_equal(a, b)
    # an increasing function of the scores ranks them the same: their order serves
    unit = 1 - np.exp(-np.clip(scores, 0, None))
    assert average_precision(unit, y, descending_order(scores)) == average_precision(unit, y)
    # an order that does not sort the scores is checked and replaced
    assert average_precision(scores, y, np.arange(scores.size)) == average_precision(scores, y)


def test_intensity_ranking_puts_scans_on_one_scale_lesion_side_up():
    from BrainAnomalyLib.evaluation.metrics import intensity_ranking

    rng = np.random.default_rng(0)
    brain = np.zeros((10, 10, 10), bool)
    brain[2:8, 2:8, 2:8] = True
    scan = rng.normal(100.0, 10.0, brain.shape)
    scan[4, 4, 4] = 40.0  # a dark lesion
    dark = intensity_ranking(scan, brain, -1.0)
    assert dark[4, 4, 4] == dark[brain].max()
    # The same scan at another scale and offset ranks and scores the same: scans can be pooled.
    np.testing.assert_allclose(intensity_ranking(3.0 * scan + 500.0, brain, -1.0), dark, rtol=1e-4, atol=1e-4)
    assert abs(float(np.median(dark[brain]))) < 1e-6
    assert intensity_ranking(scan, brain, 1.0)[4, 4, 4] == intensity_ranking(scan, brain, 1.0)[brain].min()

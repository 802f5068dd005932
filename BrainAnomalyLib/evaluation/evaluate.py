"""Evaluate scorers on a manifest through exactly the detection path: each scan is preprocessed once, every
scorer then scores, post-processes, back-projects and thresholds it as `detect` would."""

from __future__ import annotations

import time
import tracemalloc
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import SimpleITK as sitk

from ..calibration import CalibrationCurve, Threshold
from ..core.errors import BadInputError
from ..core.io import read_volume
from ..core.manifest import Case
from ..detection.pipeline import Detector
from ..preprocess.chain import preprocess
from ..core.progress import Reporter
from .metrics import average_precision, best_dice, lesion_detection, pr_curve, roc_auc


@dataclass
class Shown:
    """One case kept for the best/worst montage."""

    key: str
    ap: float
    scan: sitk.Image
    heat: sitk.Image
    pred: sitk.Image
    truth: sitk.Image
    brain: sitk.Image


@dataclass
class Tally:
    """Everything one scorer accumulates over a cohort."""

    threshold: Threshold
    scores: List[np.ndarray] = field(default_factory=list)
    labels: List[np.ndarray] = field(default_factory=list)
    inter: int = 0
    pred_sum: int = 0
    truth_sum: int = 0
    true_lesions: int = 0
    found: int = 0
    fp_lesions: int = 0
    n_lesion_scans: int = 0
    healthy_flagged: int = 0
    healthy_voxels: int = 0
    healthy_case_fpr: List[float] = field(default_factory=list)
    nonlesion_flagged: int = 0
    nonlesion_voxels: int = 0
    scan_scores: List[tuple] = field(default_factory=list)  # (score, is lesion scan)
    seconds: List[float] = field(default_factory=list)
    peak_mb: float = 0.0
    per_case: List[dict] = field(default_factory=list)
    best: Optional[Shown] = None
    worst: Optional[Shown] = None


def _truth(case: Case, scan: sitk.Image) -> Optional[sitk.Image]:
    if case.mask is None:
        return None
    try:
        truth = sitk.ReadImage(str(case.mask))
    except RuntimeError:
        raise BadInputError(f"{case.key}: cannot read mask {case.mask}") from None
    if truth.GetSize() != scan.GetSize():
        raise BadInputError(f"{case.key}: mask size {truth.GetSize()} differs from image size {scan.GetSize()}")
    return truth


def evaluate(cases: Sequence[Case], detectors: Dict[str, Detector], reporter: Optional[Reporter] = None,
             skipped: Optional[List[str]] = None, thresholds: Optional[Dict[str, Threshold]] = None) -> Dict[str, dict]:
    """Metrics per scorer name. Cases with a mask are lesion scans; cases without are healthy scans.

    Each scorer is thresholded at `thresholds[name]` (as chosen by Detector.threshold) or its default.
    """
    grouped = evaluate_groups(cases, detectors, lambda case: "all", reporter, skipped, thresholds)
    return {name: by_group["all"] for name, by_group in grouped.items()}


def evaluate_groups(cases: Sequence[Case], detectors: Dict[str, Detector], group_of: Callable[[Case], Optional[str]],
                    reporter: Optional[Reporter] = None, skipped: Optional[List[str]] = None,
                    thresholds: Optional[Dict[str, Threshold]] = None) -> Dict[str, Dict[str, dict]]:
    """Metrics per scorer and per group of cases ({scorer: {group: metrics}}), each scan preprocessed once.

    `group_of(case)` names a case's group; a case in group None counts in every group (healthy scans shared by
    several lesion sets).
    """
    reporter = reporter or Reporter()
    if not detectors:
        raise ValueError("no scorers to evaluate")
    first = next(iter(detectors.values()))
    for name, det in detectors.items():
        if det.preprocess_config != first.preprocess_config or det.grid != first.grid:
            raise ValueError(f"{name}: scorers evaluated together must share preprocessing and grid")
    thresholds = thresholds or {}
    groups = sorted({g for g in map(group_of, cases) if g is not None})
    tallies = {(name, g): Tally(thresholds.get(name) or det.threshold())
               for name, det in detectors.items() for g in groups}
    skipped = [] if skipped is None else skipped
    for i, case in enumerate(cases):
        rep = reporter.sub(i / len(cases), (i + 1) / len(cases))
        rep(f"evaluate {case.key}", 0.0)
        try:
            scan = read_volume(case.image)
            truth_img = _truth(case, scan)
            t = time.perf_counter()
            pre = preprocess(scan, first.preprocess_config, first.grid, first.device.startswith("cuda"),
                             rep.sub(0.0, 0.8))
        except BadInputError as exc:
            skipped.append(f"{case.key}: {exc}")
            continue
        pre_seconds = time.perf_counter() - t
        brain = pre.native_mask
        truth = None if truth_img is None else sitk.GetArrayFromImage(truth_img) > 0
        group = group_of(case)
        for name, det in detectors.items():
            threshold = tallies[(name, groups[0])].threshold
            tracemalloc.start()
            t = time.perf_counter()
            analysis = det.analyse(scan, pre=pre)
            result = det.to_result(scan, analysis, det.for_scan(threshold, analysis), det.model.modality,
                                   with_reconstruction=False)
            seconds = pre_seconds + time.perf_counter() - t
            peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
            tracemalloc.stop()
            for g in ([group] if group is not None else groups):
                tally = tallies[(name, g)]
                tally.seconds.append(seconds)
                tally.peak_mb = max(tally.peak_mb, peak)
                _add_case(tally, case, scan, result, brain, truth, truth_img)
        rep(f"evaluate {case.key}", 1.0)
    out: Dict[str, Dict[str, dict]] = {name: {} for name in detectors}
    for (name, g), tally in tallies.items():
        out[name][g] = summarise(tally, detectors[name])
    return out


def _add_case(tally: Tally, case: Case, scan, result, brain, truth, truth_img) -> None:
    heat = sitk.GetArrayFromImage(result.anomaly_map)
    pred = sitk.GetArrayFromImage(result.pred_mask) > 0
    above = (heat > result.threshold["value"]) & brain  # this scan's threshold (scan-adaptive or cohort)
    row = {"case": case.key, "pred_score": round(result.pred_score, 5), "n_pred_lesions": len(result.lesions),
           "threshold": round(result.threshold["value"], 5)}
    tally.scan_scores.append((result.pred_score, truth is not None))
    if truth is None:
        fpr = float(above.sum() / max(brain.sum(), 1))
        tally.healthy_flagged += int(above.sum())
        tally.healthy_voxels += int(brain.sum())
        tally.healthy_case_fpr.append(fpr)
        row["healthy_fpr"] = round(fpr, 6)
        tally.fp_lesions += len(result.lesions)
        tally.per_case.append(row)
        return
    t_in = truth & brain
    tally.n_lesion_scans += 1
    tally.scores.append(heat[brain].astype(np.float32))
    tally.labels.append(truth[brain])
    tally.inter += int((pred & truth).sum())
    tally.pred_sum += int(pred.sum())
    tally.truth_sum += int(truth.sum())
    det = lesion_detection(pred, truth)
    tally.true_lesions += det["true_lesions"]
    tally.found += det["found"]
    tally.fp_lesions += det["fp_lesions"]
    normal = brain & ~truth
    tally.nonlesion_flagged += int((above & normal).sum())
    tally.nonlesion_voxels += int(normal.sum())
    ap = average_precision(heat[brain], t_in[brain]) if t_in.any() else float("nan")
    dice = 2 * (pred & truth).sum() / max(pred.sum() + truth.sum(), 1)
    row.update(ap=round(ap, 4), dice=round(float(dice), 4), lesion_ml=round(float(truth.sum()) * np.prod(
        scan.GetSpacing()) / 1000, 2), nonlesion_fpr=round(float((above & normal).sum() / max(normal.sum(), 1)), 5),
        **det)
    tally.per_case.append(row)
    if not np.isnan(ap):
        shown = Shown(case.key, ap, scan, result.anomaly_map, result.pred_mask, truth_img, result.brain_mask)
        if tally.best is None or ap > tally.best.ap:
            tally.best = shown
        if tally.worst is None or ap < tally.worst.ap:
            tally.worst = shown


def _unit(meta: dict, scores: np.ndarray) -> np.ndarray:
    """Scores in [0, 1] for MOOD-style AP: 1 - healthy FPR through the calibration; clipped raw scores otherwise."""
    curve = CalibrationCurve.from_meta(meta)
    if curve is None:
        return np.clip(scores, 0, 1)
    return np.clip(curve.score_to_unit(scores), 0, 1)


def summarise(t: Tally, det: Detector) -> dict:
    out: dict = {"model": det.model.name, "kind": det.model.kind, "modality": det.model.modality,
                 "direction": det.scorer.params.get("direction"), "threshold": t.threshold.to_dict(),
                 "n_lesion_scans": t.n_lesion_scans, "n_healthy_scans": len(t.healthy_case_fpr)}
    if t.scores:
        scores, labels = np.concatenate(t.scores), np.concatenate(t.labels)
        bd, bt = best_dice(scores, labels)
        unit = _unit(det.model.meta, scores)
        recall, precision = pr_curve(scores, labels)
        out["voxel"] = {"auprc": average_precision(scores, labels), "auroc": roc_auc(scores, labels),
                        "best_dice_upper_bound": bd, "best_dice_threshold": bt,
                        "dice_at_threshold": 2 * t.inter / max(t.pred_sum + t.truth_sum, 1),
                        "mean_case_dice": float(np.mean([r["dice"] for r in t.per_case if "dice" in r])),
                        "mood_ap": average_precision(unit, labels),
                        "prevalence": float(labels.mean())}
        out["pr_curve"] = {"recall": recall.round(5).tolist(), "precision": precision.round(5).tolist()}
        out["lesion"] = {"true_lesions": t.true_lesions, "found": t.found,
                         "sensitivity": t.found / max(t.true_lesions, 1)}
        out["nonlesion_fpr"] = t.nonlesion_flagged / max(t.nonlesion_voxels, 1)
    scans = len(t.scan_scores)
    out["fp_lesions_per_scan"] = t.fp_lesions / max(scans, 1)
    if t.healthy_case_fpr:
        out["healthy_fpr"] = t.healthy_flagged / max(t.healthy_voxels, 1)
        out["healthy_fpr_per_scan"] = {"mean": float(np.mean(t.healthy_case_fpr)),
                                       "max": float(np.max(t.healthy_case_fpr))}
    kinds = {lab for _, lab in t.scan_scores}
    if kinds == {True, False}:
        s = np.array([v for v, _ in t.scan_scores])
        y = np.array([lab for _, lab in t.scan_scores])
        out["scan"] = {"auroc": roc_auc(s, y),
                       "mood_sample_ap": average_precision(_unit(det.model.meta, s), y)}
    if t.seconds:
        out["seconds_per_volume"] = float(np.mean(t.seconds))
        out["scoring_peak_mb"] = round(t.peak_mb, 1)
    out["per_case"] = t.per_case
    out["_shown"] = {"best": t.best, "worst": t.worst}
    return out

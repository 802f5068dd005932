"""Evaluate scorers on a manifest through exactly the detection path: each scan is preprocessed once, every
scorer then scores, post-processes, back-projects and thresholds it as `detect` would. Each scan's in-brain map
is kept (as in-brain values plus a packed brain mask) so a FROC curve can re-threshold it afterwards without
re-running the model."""

from __future__ import annotations

import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..calibration import CalibrationCurve, Threshold
from ..core.box import mask_box
from ..core.errors import BadInputError
from ..core.io import read_volume
from ..core.manifest import Case
from ..detection.fusion import FusionDetector
from ..detection.pipeline import Detector
from ..detection.postprocess import CONNECTIVITY, findings
from ..preprocess.chain import preprocess
from ..store.cache import cached_companion, cached_preprocessed
from ..scorers.reuse import shared_scores
from ..core.progress import Reporter
from .metrics import (HIT_RULE, average_precision, descending_order, detection_summary, finding_match, froc,
                      roc_auc, sweep_thresholds, voxel_curve_metrics)

# The FROC sweep: thresholds above which these fractions of the pooled brain voxels lie, plus the cohort threshold.
# Thirteen labellings per scan: about 7.5 s for a BraTS-sized scan (2 M brain voxels) on a shared 2-core CPU.
FROC_TOP_FRACTIONS = (0.2, 0.1, 0.05, 0.03, 0.02, 0.01, 0.005, 0.002, 0.001, 5e-4, 2e-4, 1e-4)


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
class ScanMap:
    """One scan's anomaly map as the FROC sweep needs it, cropped to the brain's bounding box."""

    values: np.ndarray  # the map at the brain voxels, in C order
    brain: np.ndarray  # np.packbits of the brain mask in the crop
    shape: tuple  # the crop's shape
    voxel_ml: float
    min_lesion_ml: float
    healthy: bool  # came without a mask
    truth_at: np.ndarray  # positions in `values` that are ground truth...
    truth_ids: np.ndarray  # ...and their connected-component numbers
    truth_sizes: np.ndarray  # voxels of each ground-truth component over the whole mask (in the brain or not)


def truth_components(truth: np.ndarray):
    """Connected ground-truth components (26-connected, as the findings) and their sizes in voxels."""
    labels, _ = ndimage.label(truth, CONNECTIVITY)
    return labels, np.bincount(labels.ravel())[1:]


def scan_map(heat: np.ndarray, brain: np.ndarray, truth_labels: Optional[np.ndarray],
             truth_sizes: Optional[np.ndarray], voxel_ml: float, min_lesion_ml: float,
             values: Optional[np.ndarray] = None) -> ScanMap:
    """Keep a scan's map for the sweep; `truth_labels` None for a healthy scan; `values` = heat[brain] if the
    caller already has it (shared, not copied)."""
    box = mask_box(brain)
    crop = brain[box]
    if values is None:
        values = heat[brain].astype(np.float32)
    ids = truth_labels[brain] if truth_labels is not None else np.zeros(values.size, np.int32)
    at = np.flatnonzero(ids)
    return ScanMap(values, np.packbits(crop.ravel()), crop.shape, voxel_ml, min_lesion_ml, truth_labels is None,
                   at, ids[at].astype(np.int32), np.zeros(0, np.int64) if truth_sizes is None else truth_sizes)


def sweep(m: ScanMap, thresholds) -> List[dict]:
    """`finding_match` of one kept scan at each threshold; each labelling is confined to the bounding box of the
    voxels above that threshold, so high thresholds cost little."""
    size = int(np.prod(m.shape))
    flat = np.flatnonzero(np.unpackbits(m.brain, count=size))
    truth_crop = np.zeros(size, np.int32)
    truth_crop[flat[m.truth_at]] = m.truth_ids
    truth_crop = truth_crop.reshape(m.shape)
    out = []
    for t in thresholds:
        sel = flat[m.values > t]
        if not sel.size:
            out.append(finding_match(np.zeros(1, np.int32), np.zeros(1, np.int32), m.truth_sizes))
            continue
        above = np.zeros(m.shape, bool)
        above[np.unravel_index(sel, m.shape)] = True
        box = mask_box(above)
        out.append(finding_match(findings(above[box], m.voxel_ml, m.min_lesion_ml), truth_crop[box], m.truth_sizes))
    return out


@dataclass
class Tally:
    """Everything one scorer accumulates over a cohort."""

    threshold: Threshold
    # each lesion scan's brain voxels, highest score first (the cohort's sort then merges sorted runs), and labels
    scores: List[np.ndarray] = field(default_factory=list)
    labels: List[np.ndarray] = field(default_factory=list)
    inter: int = 0
    pred_sum: int = 0
    truth_sum: int = 0
    true_lesions: int = 0
    found: int = 0
    fp_lesions: int = 0
    n_lesion_scans: int = 0
    matches: List[dict] = field(default_factory=list)  # finding_match per scan (as scan_scores) at its threshold
    maps: List[ScanMap] = field(default_factory=list)
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
             skipped: Optional[List[str]] = None, thresholds: Optional[Dict[str, Threshold]] = None,
             companions: Optional[Mapping[str, Mapping[str, Path]]] = None, cache: bool = False,
             workers: int = 1) -> Dict[str, dict]:
    """Metrics per scorer name. Cases with a mask are lesion scans; cases without are healthy scans.

    Each scorer is thresholded at `thresholds[name]` (as chosen by Detector.threshold) or its default. A fusion
    model scores each case with the subject's other contrasts, `companions` (subject -> modality -> image); the
    case's own scan is its reference, the one whose grid and mask the metrics use.
    """
    grouped = evaluate_groups(cases, detectors, _all, reporter, skipped, thresholds, companions, cache, workers)
    return {name: by_group["all"] for name, by_group in grouped.items()}


def _all(case: Case) -> str:
    return "all"


def evaluate_groups(cases: Sequence[Case], detectors: Dict[str, Detector], group_of: Callable[[Case], Optional[str]],
                    reporter: Optional[Reporter] = None, skipped: Optional[List[str]] = None,
                    thresholds: Optional[Dict[str, Threshold]] = None,
                    companions: Optional[Mapping[str, Mapping[str, Path]]] = None,
                    cache: bool = False, workers: int = 1) -> Dict[str, Dict[str, dict]]:
    """Metrics per scorer and per group of cases ({scorer: {group: metrics}}), each scan preprocessed once, and
    with `cache` (store/cache.py) once across runs: the preprocessing cache gives back exactly what preprocessing
    gave, so a cached run scores the same (its seconds per volume then count the cache read, not preprocessing).
    A fusion model scores each case with the subject's other contrasts, `companions` (subject -> modality -> image).

    `group_of(case)` names a case's group; a case in group None counts in every group (healthy scans shared by
    several lesion sets). With `workers` > 1 the cases run in that many worker processes (core/workers.py), with
    the same numbers: each case's share is merged in the cases' order.
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
    chosen = {name: tallies[(name, groups[0])].threshold for name in detectors}

    def merge(i: int, parts: Dict[tuple, Tally], lines: List[str]) -> None:
        skipped.extend(lines)
        for key, part in parts.items():
            _merge(tallies[key], part)

    if workers <= 1 or len(cases) <= 1:
        for i, case in enumerate(cases):
            merge(i, *_evaluate_case(detectors, case, group_of(case), groups, chosen, companions, cache,
                                     reporter.sub(i / len(cases), (i + 1) / len(cases))))
    else:
        _evaluate_in_pool(detectors, cases, [group_of(c) for c in cases], groups, chosen, companions, cache,
                          reporter, workers, merge)
    out: Dict[str, Dict[str, dict]] = {name: {} for name in detectors}
    keys = list(tallies)
    # Each (scorer, group) is summarised on its own, and the sorts and labellings that take the time release the
    # GIL: on `workers` threads they use the cores the cases just left.
    with ThreadPoolExecutor(max(1, min(workers, len(keys)))) as threads:
        for (name, g), summary in zip(keys, threads.map(lambda k: summarise(tallies[k], detectors[k[0]]), keys)):
            out[name][g] = summary
    return out


def _evaluate_case(detectors: Dict[str, Detector], case: Case, group: Optional[str], groups: List[str],
                   chosen: Dict[str, Threshold], companions, cache: bool, rep: Reporter
                   ) -> Tuple[Dict[tuple, Tally], List[str]]:
    """One case through every scorer: what it adds to each (scorer, group) tally, and the lines of what was
    skipped. The case's scan is preprocessed once for all the scorers."""
    parts: Dict[tuple, Tally] = {}
    lines: List[str] = []
    first = next(iter(detectors.values()))
    rep(f"evaluate {case.key}", 0.0)
    try:
        scan = read_volume(case.image)
        truth_img = _truth(case, scan)
        t = time.perf_counter()
        if cache:
            pre = cached_preprocessed(case.image, scan, first.preprocess_config, first.grid,
                                      use_gpu=first.device.startswith("cuda"), reporter=rep.sub(0.0, 0.8))
        else:
            pre = preprocess(scan, first.preprocess_config, first.grid, first.device.startswith("cuda"),
                             rep.sub(0.0, 0.8))
    except BadInputError as exc:
        return parts, [f"{case.key}: {exc}"]
    pre_seconds = time.perf_counter() - t
    brain = pre.native_mask
    truth = None if truth_img is None else sitk.GetArrayFromImage(truth_img) > 0
    # the ground truth's components, once per case, not per scorer
    truth_parts = None if truth is None else truth_components(truth)
    with shared_scores() as shared:  # an ensemble's members scored on their own too are scored once
        for name, det in detectors.items():
            tracemalloc.start()
            t = time.perf_counter()
            reused = shared.reused_seconds
            try:
                analysis = _analyse(det, case, scan, pre, companions, cache)
            except BadInputError as exc:
                lines.append(f"{case.key} ({name}): {exc}")
                tracemalloc.stop()
                continue
            result = det.to_result(scan, analysis, det.for_scan(chosen[name], analysis), det.model.modality,
                                   with_reconstruction=False)
            # what the scorer would have spent on the maps it was handed counts as its own
            seconds = pre_seconds + time.perf_counter() - t + shared.reused_seconds - reused
            peak = tracemalloc.get_traced_memory()[1] / 2 ** 20
            tracemalloc.stop()
            tally = Tally(chosen[name])
            tally.seconds.append(seconds)
            tally.peak_mb = peak
            _add_case(tally, case, scan, result, brain, truth, truth_img, truth_parts)
            # a case counted in every group (shared healthy scans) adds the same share to each
            for g in ([group] if group is not None else groups):
                parts[(name, g)] = tally if group is not None else _copy(tally)
    rep(f"evaluate {case.key}", 1.0)
    return parts, lines


def _merge(tally: Tally, part: Tally) -> None:
    """Add one case's tally to the cohort's (cases merged in their order give the numbers of one sequential
    pass)."""
    for f in fields(Tally):
        mine, theirs = getattr(tally, f.name), getattr(part, f.name)
        if f.name in ("threshold", "best", "worst"):
            continue
        if f.name == "peak_mb":
            tally.peak_mb = max(mine, theirs)
        elif isinstance(mine, list):
            mine.extend(theirs)
        else:
            setattr(tally, f.name, mine + theirs)
    if part.best is not None and (tally.best is None or part.best.ap > tally.best.ap):
        tally.best = part.best
    if part.worst is not None and (tally.worst is None or part.worst.ap < tally.worst.ap):
        tally.worst = part.worst


# A pool worker's scorers, rebuilt once from the models (not sent with every case).
_POOL_DETECTORS: Dict[str, Detector] = {}


def _pool_setup(specs) -> None:
    for name, (model, options) in specs.items():
        _POOL_DETECTORS[name] = Detector.for_model(model, **options)


def _pool_case(case, group, groups, chosen, companions, cache):
    return _evaluate_case(_POOL_DETECTORS, case, group, groups, chosen, companions, cache, Reporter())


def _evaluate_in_pool(detectors, cases, case_groups, groups, chosen, companions, cache, reporter: Reporter,
                      workers: int, merge) -> None:
    """The cases on `workers` processes, each holding every scorer; their tallies merged in the cases' order."""
    from concurrent.futures import FIRST_COMPLETED, wait

    from ..core.workers import spawn_pool, stop_pool

    specs = {name: (det.model, {"device": det.device, "preprocess_config": det.preprocess_config,
                                "postprocess_config": det.postprocess_config, "calibration": det.calibration})
             for name, det in detectors.items()}
    pool = spawn_pool(min(workers, len(cases)), _pool_setup, (specs,))
    try:
        running = {pool.submit(_pool_case, case, g, groups, chosen, companions, cache): i
                   for i, (case, g) in enumerate(zip(cases, case_groups))}
        results, merged = {}, 0
        while running:
            ready, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
            reporter.check()
            for fut in ready:
                results[running.pop(fut)] = fut.result()
            while merged in results:  # merge in the cases' order as soon as the next one is in
                merge(merged, *results.pop(merged))
                merged += 1
                reporter(f"evaluate: {merged} of {len(cases)} cases", merged / len(cases))
    except BaseException:
        stop_pool(pool)
        raise
    pool.shutdown(wait=True)


def _analyse(det: Detector, case: Case, scan: sitk.Image, pre, companions, cache: bool = False):
    """The detector's grid analysis of a case: the scan alone, or with the subject's other contrasts for a fusion
    model (the case's own preprocessing reused when its contrast is the fusion's reference; with `cache`, the other
    contrasts' too, from the preprocessing cache)."""
    if not isinstance(det, FusionDetector):
        return det.analyse(scan, pre=pre)
    given = {m: p for m, p in ((companions or {}).get(case.subject) or {}).items()
             if m != case.modality and m in det.modalities}
    scans = dict({case.modality: scan}, **{m: read_volume(p) for m, p in given.items()})
    if det.reference_modality(det.inputs(scans)) != case.modality:
        raise BadInputError(f"the fusion's reference contrast is {det.reference_modality(scans)}, not "
                            f"{case.modality}; evaluate its rows")
    companion = None
    if cache:
        def companion(m, native, ref_pre, ref_native, config, reporter):
            return cached_companion(given[m], native, ref_pre, ref_native, case.image, det.preprocess_config, config,
                                    reporter)
    return det.analyse_contrasts(scans, pre=pre, companion=companion)


def _copy(tally: Tally) -> Tally:
    """A tally of its own with the same contents (the arrays it holds are shared, never changed)."""
    out = Tally(tally.threshold)
    _merge(out, tally)
    return out


def _add_case(tally: Tally, case: Case, scan, result, brain, truth, truth_img, truth_parts) -> None:
    heat = sitk.GetArrayFromImage(result.anomaly_map)
    pred = sitk.GetArrayFromImage(result.pred_mask) > 0
    above = (heat > result.threshold["value"]) & brain  # this scan's threshold (scan-adaptive or cohort)
    voxel_ml = float(np.prod(result.anomaly_map.GetSpacing())) / 1000.0  # as label_lesions computes it
    found = findings(pred, voxel_ml, result.min_lesion_ml)
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
        match = finding_match(found, np.zeros(found.shape, np.int32))
        tally.matches.append(match)
        tally.maps.append(scan_map(heat, brain, None, None, voxel_ml, result.min_lesion_ml))
        row["false_findings"] = match["false_findings"]
        tally.per_case.append(row)
        return
    t_in = truth & brain
    t_lab, t_sizes = truth_parts
    match = finding_match(found, t_lab, t_sizes)  # the sizes counted once per case, not per scorer
    tally.matches.append(match)
    tally.n_lesion_scans += 1
    values = heat[brain].astype(np.float32)
    order = descending_order(values)  # one sort per scan for its AP and, merged, the cohort's curves
    tally.scores.append(values[order])
    tally.maps.append(scan_map(heat, brain, t_lab, t_sizes, voxel_ml, result.min_lesion_ml, values))
    tally.labels.append(truth[brain][order])
    tally.inter += int((pred & truth).sum())
    tally.pred_sum += int(pred.sum())
    tally.truth_sum += int(truth.sum())
    det = {"true_lesions": match["true_lesions"], "found": match["found"], "pred_lesions": match["findings"],
           "fp_lesions": match["false_findings"]}
    tally.true_lesions += det["true_lesions"]
    tally.found += det["found"]
    tally.fp_lesions += det["fp_lesions"]
    normal = brain & ~truth
    tally.nonlesion_flagged += int((above & normal).sum())
    tally.nonlesion_voxels += int(normal.sum())
    ap = average_precision(heat[brain], t_in[brain], order) if t_in.any() else float("nan")
    dice = 2 * (pred & truth).sum() / max(pred.sum() + truth.sum(), 1)
    row.update(ap=round(ap, 4), dice=round(float(dice), 4), lesion_ml=round(float(truth.sum()) * np.prod(
        scan.GetSpacing()) / 1000, 2), nonlesion_fpr=round(float((above & normal).sum() / max(normal.sum(), 1)), 5),
        **det, patient_found=match["patient_found"], largest_found=match["largest_found"],
        false_findings=match["false_findings"])
    tally.per_case.append(row)
    if not np.isnan(ap):
        shown = Shown(case.key, ap, scan, result.anomaly_map, result.pred_mask, truth_img, result.brain_mask)
        if tally.best is None or ap > tally.best.ap:
            tally.best = shown
        if tally.worst is None or ap < tally.worst.ap:
            tally.worst = shown


def froc_of(t: Tally) -> Optional[dict]:
    """The FROC sweep over a tally's kept maps (None without scans): every scan at the same thresholds, the
    scan-adaptive move left out, so the cohort threshold's row is what `--calibration cohort` reports."""
    if not t.maps:
        return None
    pooled = np.concatenate([m.values for m in t.maps])
    thresholds = sweep_thresholds(pooled, FROC_TOP_FRACTIONS, [t.threshold.value])
    curve = froc(thresholds, [sweep(m, thresholds) for m in t.maps], [m.healthy for m in t.maps])
    curve["brain_fraction_above"] = [float(np.mean(pooled > v)) for v in thresholds]
    curve["cohort_threshold"] = float(t.threshold.value)
    curve["hit_rule"] = HIT_RULE
    return curve


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
        order = descending_order(scores)
        v = voxel_curve_metrics(scores, labels, order)
        unit = _unit(det.model.meta, scores)
        recall, precision = v["pr_curve"]
        out["voxel"] = {"auprc": v["auprc"], "auroc": v["auroc"],
                        "best_dice_upper_bound": v["best_dice"], "best_dice_threshold": v["best_dice_threshold"],
                        "dice_at_threshold": 2 * t.inter / max(t.pred_sum + t.truth_sum, 1),
                        "mean_case_dice": float(np.mean([r["dice"] for r in t.per_case if "dice" in r])),
                        "mood_ap": average_precision(unit, labels, order),  # unit rises with the scores
                        "prevalence": float(labels.mean())}
        out["pr_curve"] = {"recall": recall.round(5).tolist(), "precision": precision.round(5).tolist()}
        out["lesion"] = {"true_lesions": t.true_lesions, "found": t.found,
                         "sensitivity": t.found / max(t.true_lesions, 1)}
        out["nonlesion_fpr"] = t.nonlesion_flagged / max(t.nonlesion_voxels, 1)
    scans = len(t.scan_scores)
    out["fp_lesions_per_scan"] = t.fp_lesions / max(scans, 1)
    if t.matches:
        summary = detection_summary(t.matches, [not lesion for _, lesion in t.scan_scores])
        out["patient"] = {k: summary[k] for k in ("patients", "patients_found", "patient_rate", "largest_found",
                                                  "largest_rate")}
        out["patient"]["hit_rule"] = HIT_RULE
        out["false_findings"] = {"per_healthy_scan": summary["false_findings_per_healthy_scan"],
                                 "per_lesion_scan": summary["false_findings_per_lesion_scan"],
                                 "per_scan": summary["false_findings_per_scan"]}
        out["froc"] = froc_of(t)
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

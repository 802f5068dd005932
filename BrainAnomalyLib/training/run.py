"""Training a scorer on healthy scans from a manifest, and calibrating its thresholds on held-out healthy scans."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from ..store.cache import cases_on_grid, grid_volumes
from ..calibration import (BASE_FPR, DEFAULT_FPRS, AdaptiveReference, CalibrationCurve, FindingCalibration,
                           HealthyPool, labelled_refinement)
from ..calibration.findings import FindingRule
from ..core.errors import BadInputError
from ..core.manifest import Case, read_manifest
from ..store.models import Model, save_model
from ..detection.postprocess import PostprocessConfig
from ..preprocess.chain import PreprocessConfig
from ..preprocess.normalise import fit_histogram_reference, histogram_landmarks
from ..core.progress import Reporter
from ..scorers import direction_for, scorer_class
from ..core.template import Grid
from .meta import base_meta, training_data
from .network_fit import attach_reports, fit_network


def split_subjects(cases: Sequence[Case], fractions=(0.7, 0.15, 0.15)) -> Dict[str, List[Case]]:
    """Subject-level split, stable across runs and machines: ordered by a hash of the subject id."""
    subjects = sorted({c.subject for c in cases}, key=lambda s: hashlib.sha1(s.encode()).hexdigest())
    n = len(subjects)
    n_train = int(round(fractions[0] * n))
    n_cal = int(round(fractions[1] * n))
    groups = {"train": set(subjects[:n_train]), "calibration": set(subjects[n_train:n_train + n_cal]),
              "test": set(subjects[n_train + n_cal:])}
    return {k: [c for c in cases if c.subject in v] for k, v in groups.items()}


def histogram_reference(cases: Sequence[Case], pre: PreprocessConfig, grid: Grid, reporter: Reporter,
                        cache_dir: Optional[Path] = None) -> list:
    """The Nyul standard scale of a training cohort (landmarks of the un-standardised grid volumes)."""
    # Scans skipped here are skipped again, and reported, when the model is fitted.
    volumes = cases_on_grid(cases, pre, grid, reporter, cache_dir, "histogram reference", [], standardised=False)
    return fit_histogram_reference(histogram_landmarks(raw, mask) for _, raw, mask in volumes)


# Fewer healthy scans than this give thresholds that move with the particular scans (the 1 % tail of one or two
# brains), so calibrating on fewer is refused unless asked for, and then recorded in the model.
MIN_CALIBRATION_SCANS = 5
ALLOW_FEW_FLAG = "--allow-few-scans"


def check_calibration_scans(n: int, allow_few: bool, what: str = "healthy scan(s) to calibrate on") -> None:
    """Refuse calibrating on fewer than MIN_CALIBRATION_SCANS scans unless `allow_few`."""
    if n < MIN_CALIBRATION_SCANS and not allow_few:
        raise BadInputError(f"{n} {what}; calibration needs at least {MIN_CALIBRATION_SCANS} (pass "
                            f"{ALLOW_FEW_FLAG} to calibrate on fewer; the model then records that it was)")


def calibrate(model: Model, cases: Sequence[Case], reporter: Reporter, cache_dir: Optional[Path] = None,
              fprs: Sequence[float] = DEFAULT_FPRS, allow_few_scans: bool = False) -> dict:
    """A model's `calibration` record from healthy scans, through its own scoring and post-processing: the table
    at `fprs`, the dense curve and the scan-adaptive reference (see calibration.HealthyPool), and the findings
    those scans produce at the base threshold (`findings`, see calibration.findings). Fewer than
    MIN_CALIBRATION_SCANS scans (given, or usable after skipping bad ones) are refused unless `allow_few_scans`;
    then the record says so under "few_scans"."""
    from ..detection.pipeline import Detector

    if model.kind == "fusion":
        return _calibrate_fusion(model, cases, reporter, fprs, allow_few_scans)
    check_calibration_scans(len(cases), allow_few_scans)
    det = Detector(model, device="cpu")
    skipped: List[str] = []
    volumes = ((case.subject, image, mask) for case, image, mask in
               cases_on_grid(cases, det.preprocess_config, det.grid, reporter.sub(0.0, 0.9), cache_dir, "calibrate",
                             skipped))
    return calibrate_volumes(model, volumes, reporter.sub(0.9, 1.0), fprs, allow_few_scans, skipped, len(cases))


def _calibrate_fusion(model: Model, cases: Sequence[Case], reporter: Reporter, fprs: Sequence[float],
                      allow_few_scans: bool) -> dict:
    """`calibrate` for a fusion model: each subject's healthy rows of its contrasts are one session, brought onto
    the grid through one registration as detection brings them (not cached)."""
    from ..core.io import read_volume
    from ..core.manifest import group_by_subject
    from ..detection.pipeline import Detector

    det = Detector.for_model(model, device="cpu")
    sessions = group_by_subject(list(cases), det.modalities)
    check_calibration_scans(len(sessions), allow_few_scans, "healthy session(s) to calibrate on")
    skipped: List[str] = []

    def volumes():
        for i, (subject, rows) in enumerate(sessions.items()):
            try:
                scans = {c.modality: read_volume(c.image) for c in rows}
                pre, images, _ = det.grid_volumes(scans, reporter.sub(0.9 * i / len(sessions),
                                                                    0.9 * (i + 1) / len(sessions)))
            except BadInputError as exc:
                skipped.append(f"{subject}: {exc}")
                continue
            yield subject, images, pre.mask

    return calibrate_volumes(model, volumes(), reporter.sub(0.9, 1.0), fprs, allow_few_scans, skipped,
                             len(sessions))


def calibrate_volumes(model: Model, volumes: Iterable[Tuple[str, np.ndarray, np.ndarray]], reporter: Reporter,
                      fprs: Sequence[float] = DEFAULT_FPRS, allow_few_scans: bool = False,
                      skipped: Sequence[str] = (), n_given: Optional[int] = None) -> dict:
    """`calibrate` on healthy volumes already on the model grid: (subject, image, brain mask) triples, e.g.
    synthetic scans made from the template for a contrast without a healthy cohort (for a fusion model the image
    is a dict, modality -> volume, all on one grid and mask). `skipped` may still grow
    while `volumes` is read (cases_on_grid adds the scans it cannot read)."""
    from ..detection.pipeline import Detector

    det = Detector.for_model(model, device="cpu")
    pool, kept = HealthyPool(), []
    for subject, image, mask in volumes:
        scores = det.score_grid(image, mask)
        # The whole grid brain mask, eroded-away voxels (scoring 0) included: see HealthyPool.
        pool.add(subject, scores.clean_map[mask], scores.stats)
        kept.append((scores.clean_map, scores.stats))
    calib = pool.calibration(fprs, skipped)
    n = calib["n_scans"]
    n_given = n + len(skipped) if n_given is None else n_given
    check_calibration_scans(n, allow_few_scans, f"of {n_given} healthy scans usable ({len(skipped)} skipped)")
    if n < MIN_CALIBRATION_SCANS:
        calib["few_scans"] = {"n_scans": n, "minimum": MIN_CALIBRATION_SCANS,
                              "note": f"calibrated on {n} healthy scan(s), fewer than the minimum of "
                                      f"{MIN_CALIBRATION_SCANS}, as allowed by {ALLOW_FEW_FLAG}: the thresholds and "
                                      "their false-positive rates are rough"}
    calib["findings"] = healthy_findings(det, calib, kept, reporter)
    return calib


def healthy_findings(det, record: dict, maps: Sequence[Tuple[np.ndarray, dict]], reporter: Reporter) -> dict:
    """The finding calibration from healthy scans' cleaned grid maps (and their robust statistics): each scan's
    findings at its own base threshold, as detection cuts them on a scan (the cohort curve moved by the scan's
    own move against the reference this same calibration measured)."""
    from ..detection.postprocess import label_array

    curve = CalibrationCurve.from_calibration(record)
    reference = AdaptiveReference.from_stats(stats for _, stats in maps)
    index_to_ras = np.diag(list(det.grid.spacing) + [1.0])  # only the voxel volume matters here
    per_scan = []
    for i, (clean, stats) in enumerate(maps):
        reporter("healthy findings", i / max(len(maps), 1))
        scan_curve = curve.moved(det.scan_move(stats, reference))
        rule = FindingRule(scan_curve)
        _, lesions = label_array(clean, index_to_ras, scan_curve.threshold(BASE_FPR),
                                 det.postprocess_config.min_lesion_ml, rule=rule)
        per_scan.append([les["finding_score"] for les in lesions])
    reporter("healthy findings", 1.0)
    return FindingCalibration.from_scans(per_scan, BASE_FPR).to_dict()


def _read_truth(path: Path, shape: Sequence[int]) -> np.ndarray:
    import SimpleITK as sitk

    if not Path(path).is_file():
        raise BadInputError(f"mask not found: {path}")
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        from ..core.io import itk_reason

        raise BadInputError(f"cannot read mask {path}: {itk_reason(exc)}") from None
    if img.GetDimension() == 4 and img.GetSize()[3] == 1:
        img = img[:, :, :, 0]
    arr = sitk.GetArrayFromImage(img)
    if arr.shape != tuple(shape):
        raise BadInputError(f"mask {Path(path).name} has {' x '.join(map(str, arr.shape[::-1]))} voxels but its "
                            f"scan has {' x '.join(str(int(v)) for v in tuple(shape)[::-1])}; the mask must be on the "
                            "scan's grid")
    return arr > 0


def labelled_threshold(model: Model, cases: Sequence[Case], reporter: Reporter, device: str = "cpu") -> dict:
    """The labelled refinement record: the threshold with the best pooled Dice over labelled lesion cases, through
    the full detection path (native anomaly map vs native truth > 0, within the native brain mask). Bad cases are
    skipped and named."""
    import SimpleITK as sitk

    from ..core.io import read_volume
    from ..detection.pipeline import Detector
    from ..evaluation.metrics import best_dice

    det = Detector(model, device=device)
    scores, labels, subjects, skipped = [], [], [], []
    for i, case in enumerate(cases):
        rep = reporter.sub(i / len(cases), (i + 1) / len(cases))
        rep(f"labelled {case.subject}", 0.0)
        try:
            scan = read_volume(case.image)
            truth = _read_truth(case.mask, sitk.GetArrayViewFromImage(scan).shape)
            result = det.run(scan, modality=None, reporter=rep)
        except BadInputError as exc:
            skipped.append(f"{case.key}: {exc}")
            continue
        brain = sitk.GetArrayFromImage(result.brain_mask) > 0
        scores.append(sitk.GetArrayFromImage(result.anomaly_map)[brain].astype(np.float32))
        labels.append(truth[brain])
        subjects.append(case.subject)
    reporter("labelled", 1.0)
    if not subjects:
        raise BadInputError("no usable labelled cases: " + "; ".join(skipped))
    s, y = np.concatenate(scores), np.concatenate(labels)
    if not y.any():
        raise BadInputError("the labelled cases have no lesion voxels inside their brain masks")
    dice, at = best_dice(s, y)
    return labelled_refinement(dice, at, subjects, skipped, int(y.sum()), int(y.size))


def validation_split(cases: Sequence[Case], fraction: float = 0.1) -> Tuple[List[Case], List[Case]]:
    """(fit, validation) subjects of a training split for early stopping; stable, by a hash of the subject id."""
    subjects = sorted({c.subject for c in cases}, key=lambda s: hashlib.sha1(("val:" + s).encode()).hexdigest())
    n_val = max(1, int(round(fraction * len(subjects)))) if len(subjects) > 1 else 0
    val = set(subjects[:n_val])
    return [c for c in cases if c.subject not in val], [c for c in cases if c.subject in val]



def recorded_splits(model: Model, manifest: Path) -> Tuple[Dict[str, List[Case]], List[Case]]:
    """(splits, training cases) of a trained model's healthy manifest, as `train` made them: the same subject split
    and the first n_train training subjects it recorded. For work on a trained model that must see the same
    subjects (statistics, calibration, realism)."""
    cases = [c for c in read_manifest(Path(manifest), model.modality) if c.mask is None]
    splits = split_subjects(cases)
    n_train = (model.meta.get("training_data") or {}).get("n_train")
    return splits, (splits["train"][:n_train] if n_train else splits["train"])

@dataclass
class TrainingCases:
    """A manifest's healthy subjects split as `train` splits them, and the rows it leaves out."""

    splits: Dict[str, List[Case]]
    train: List[Case]  # the training split, cut to max_train
    lesion_rows: List[Case]
    other_rows: List[Case]


def training_cases(manifest: Path, modality: str, max_train: Optional[int] = None,
                   allow_few_scans: bool = False) -> TrainingCases:
    """The healthy rows of a manifest split into train / calibration / test subjects (at least 4 healthy scans,
    and MIN_CALIBRATION_SCANS in the calibration split unless `allow_few_scans`)."""
    other_rows: List[Case] = []
    cases = read_manifest(manifest, modality, other_rows)
    lesion_rows = [c for c in cases if c.mask is not None]
    cases = [c for c in cases if c.mask is None]  # healthy-only: rows with a lesion mask are not trained on
    if len(cases) < 4:
        raise ValueError(f"{manifest}: {len(cases)} healthy {modality} scans; at least 4 are needed")
    splits = split_subjects(cases)
    check_calibration_scans(len(splits["calibration"]), allow_few_scans,
                            f"healthy scan(s) in the calibration split ({len(cases)} healthy {modality} scans, 15 % "
                            "held out for calibration)")
    return TrainingCases(splits, splits["train"][:max_train] if max_train else splits["train"], lesion_rows,
                         other_rows)


def train(kind: str, manifest: Path, modality: str, out: Path, reporter: Reporter, name: Optional[str] = None,
          direction: str = "auto", cache_dir: Optional[Path] = None,
          pre: Optional[PreprocessConfig] = None, post: Optional[PostprocessConfig] = None,
          max_train: Optional[int] = None, options: Optional[dict] = None,
          allow_few_scans: bool = False, grid: Optional[Grid] = None) -> Optional[Path]:
    """Train a scorer on the healthy rows of a manifest, then calibrate it on held-out healthy scans (at least
    MIN_CALIBRATION_SCANS of them, checked before training, unless `allow_few_scans`). `options` carries the
    settings of learned scorers (see scorers/learned_fit.py). `grid`: the model's grid (default the 2 mm template
    grid; a coarser one trains and scores in a fraction of the time, as tests of what is done with a trained model
    need; a learned net's slice size, options["arch"]["size"], must then be the grid's). Under torchrun every rank
    trains and rank 0 alone writes the model (the others return None)."""
    split = training_cases(manifest, modality, max_train, allow_few_scans)
    splits, train_cases, lesion_cases, other_rows = split.splits, split.train, split.lesion_rows, split.other_rows
    grid, pre, post = grid or Grid(), pre or PreprocessConfig(), post or PostprocessConfig()
    params = {"direction": direction_for(modality) if direction == "auto" else direction}
    cls = scorer_class(kind)
    t = time.perf_counter()
    skipped: List[str] = []
    if pre.normalisation == "histogram" and not pre.normalisation_reference:
        pre.normalisation_reference = histogram_reference(train_cases, pre, grid, reporter.sub(0.0, 0.05),
                                                          cache_dir)
    from ..scorers.learned import LearnedScorer

    if issubclass(cls, LearnedScorer):
        import shutil
        import tempfile

        fit_cases, val_cases = validation_split(train_cases)
        options = dict(options or {})
        options.setdefault("checkpoint_dir", str(Path(out).with_name(Path(out).name + ".checkpoints")))
        report_dir = Path(tempfile.mkdtemp(prefix="brainanomaly-report-"))
        options["report_dir"] = str(report_dir)
        try:
            fitted = fit_network(
                kind, params,
                grid_volumes(fit_cases, pre, grid, reporter.sub(0.0, 0.05), cache_dir, skipped=skipped),
                grid_volumes(val_cases, pre, grid, reporter.sub(0.0, 0.05), cache_dir, "validation",
                             skipped=skipped),
                lambda: grid_volumes(train_cases, pre, grid, Reporter(cancel=reporter.cancel), cache_dir, skipped=[]),
                len(train_cases), options, reporter.sub(0.05, 0.85))
            if fitted is None:
                return None
            params, tensors = fitted
            folder = _finish(kind, name, out, manifest, modality, grid, pre, post, params, tensors, train_cases,
                             splits, lesion_cases, skipped, t, reporter, cache_dir, other_rows, allow_few_scans)
            from .realism_run import check_after_training

            # Samples of a diffusion model against the calibration split, in the report (after the model is saved:
            # nothing here can cost it).
            check_after_training(kind, params, tensors, fit_cases, splits["calibration"], pre, grid, report_dir,
                                 modality, options, cache_dir, reporter.sub(1.0, 1.0))
            attach_reports(folder, report_dir)
            return folder
        finally:
            shutil.rmtree(report_dir, ignore_errors=True)
    params, tensors = cls.fit(grid_volumes(train_cases, pre, grid, reporter.sub(0.0, 0.85), cache_dir,
                                           skipped=skipped), params, reporter)
    return _finish(kind, name, out, manifest, modality, grid, pre, post, params, tensors, train_cases, splits,
                   lesion_cases, skipped, t, reporter, cache_dir, other_rows, allow_few_scans)


def _finish(kind, name, out, manifest, modality, grid, pre, post, params, tensors, train_cases, splits,
            lesion_cases, skipped, t, reporter, cache_dir, other_rows, allow_few_scans) -> Path:
    """Write the model folder, calibrate it on the calibration split and write it again with its thresholds."""
    name = name or Path(out).name
    meta = base_meta(kind, name, modality, f"{kind} scorer for {modality}, trained on {Path(manifest).name}",
                     grid, pre, post, params)
    meta["training_data"] = dict(training_data(manifest, train_cases, splits, len(lesion_cases), skipped,
                                               len(other_rows)), seconds=round(time.perf_counter() - t, 1))
    folder = save_model(out, meta, tensors)
    from ..store.models import load_model

    calib = calibrate(load_model(folder), splits["calibration"], reporter.sub(0.85, 1.0), cache_dir,
                      allow_few_scans=allow_few_scans)
    meta["calibration"] = calib
    return save_model(out, meta, tensors)

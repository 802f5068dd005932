"""Detection: one path from a volume on any grid to a Result on that same grid."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..calibration import (AdaptiveReference, CalibrationCurve, FindingCalibration, ScanMove, Threshold,
                           choose_threshold)
from ..calibration.findings import FindingRule
from ..core.background import Background
from ..core.device import resolve_device
from ..core.errors import BadInputError, BrainAnomalyError, ModelError, OutOfMemoryError
from ..core.io import array_to_image, read_volume
from ..core.manifest import normalise_modality
from ..store.models import Model, list_models, resolve_model
from .postprocess import (PostprocessConfig, clean_in_template, clip_to_mask, erode_mask, label_lesions, robust_stats,
                          scan_score, slab_voxels, small_lesion_zone)
from ..preprocess.chain import PreprocessConfig, Preprocessed, preprocess, to_native
from ..preprocess.contrast import check_contrast
from ..core.progress import Reporter
from ..core.result import Result
from ..scorers import ScoreOutput
from ..scorers.reuse import score_once, scorer_for_model
from ..core.template import Grid, contralateral_difference, midline_axis, spacing_zyx, warm_grid
from .request import CALIBRATIONS, DetectionRequest


# The preprocessing steps the networks' loading waits for (see Detector._loading_after_n4).
_BEFORE_LOADING = ("orient", "skull-strip", "bias-correct")
# With deepbet the template's grid arrays are built from the first step after the skull-strip (N4, or the registration
# without N4), once deepbet's arrays are gone.
_BEFORE_TEMPLATE = ("orient", "skull-strip")

# Detectors for model kinds that take more than one scan, by kind; the modules defining them add them (the package
# imports them all, so the table is complete once any detection module is imported).
DETECTORS: dict = {}


@dataclass
class GridScores:
    """A scorer's output on the model grid after post-processing."""

    raw_map: np.ndarray
    clean_map: np.ndarray  # filtered, clipped at 0, zero outside the scoring mask
    scoring_mask: np.ndarray  # the eroded brain mask
    reconstruction: Optional[np.ndarray]
    stats: dict  # robust location and spread of the filtered scores in the scoring mask
    notes: List[str] = field(default_factory=list)  # what the out-of-memory policy had to do


@dataclass
class GridAnalysis(GridScores):
    """Everything that happens on the model grid; evaluation and calibration stop here."""

    pre: Optional[Preprocessed] = None
    seconds: Optional[dict] = None


class Detector:
    # Where the grid resampling, standardisation, map cleaning and back-projection run in torch instead of
    # SimpleITK/numpy/scipy: None is the scoring device when it is CUDA, the CPU path otherwise (a test sets "cpu"
    # to run the torch ops on the CPU).
    torch_ops: Optional[str] = None

    def __init__(self, model: Model, device: str = "auto", preprocess_config: Optional[PreprocessConfig] = None,
                 postprocess_config: Optional[PostprocessConfig] = None, scorer_params: Optional[dict] = None,
                 calibration: str = "adaptive"):
        if calibration not in CALIBRATIONS:
            raise BadInputError(f"unknown calibration {calibration!r}; choose from {', '.join(CALIBRATIONS)}")
        self.model = model
        self.calibration = calibration
        self.device = resolve_device(device)
        meta = model.meta
        self.grid = Grid.from_dict(meta["grid"])
        self.preprocess_config = preprocess_config or PreprocessConfig.from_dict(meta.get("preprocessing", {}))
        # Scores only mean something on the intensity scale the model was built on.
        self.preprocess_config.normalisation = meta.get("preprocessing", {}).get(
            "normalisation", self.preprocess_config.normalisation)
        self.postprocess_config = postprocess_config or PostprocessConfig(**meta.get("postprocess", {}))
        self.params = dict(meta.get("params", {}), **(scorer_params or {}))
        if self.postprocess_config.contralateral or self.params.get("contralateral"):
            try:
                midline_axis(self.grid)
            except ValueError as exc:
                raise ModelError(f"model {model.name} cannot be used: {exc}") from None
        self.scorer = self._build_scorer(self.params, self.device)
        self._loading: Optional[Background] = None
        self._warming: Optional[Background] = None
        # Built while the scan is read and its brain found (one core is idle then), not inside its registration; not
        # beside deepbet, which keeps both cores busy and whose peak memory they would add to: then after it.
        if self.preprocess_config.skull_strip != "deepbet":
            self._warm_template()

    def _warm_template(self) -> None:
        if self._warming is None:
            self._warming = Background(lambda: warm_grid(self.grid), name="template", daemon=False)

    def start_loading(self) -> None:
        """Begin `prepare` on a background thread, to overlap the preprocessing; `prepare` then waits for it."""
        if self._loading is None:
            self._loading = Background(self._prepare_scorer, name=f"load {self.model.name}")

    def prepare(self, reporter: Optional[Reporter] = None) -> None:
        """The scorer's networks loaded, and with them torch (and MONAI for the networks built on it: seconds of
        imports on a first scan): by the thread `start_loading` began (its error raised here, a cancel ending the
        wait), else now."""
        if self._loading is not None:
            self._loading.result(reporter)
            self._loading = None  # a failed load stays, to fail the next scan the same way
        self._prepare_scorer()  # the networks already built: at once

    def _prepare_scorer(self) -> None:
        try:
            self.scorer.prepare()
        except BrainAnomalyError:
            raise
        except (ValueError, KeyError) as exc:
            raise ModelError(f"model {self.model.name} cannot be used: {_message(exc)}") from None

    @staticmethod
    def for_model(model: Model, **options) -> "Detector":
        """The detector of `model`'s kind (a fusion of contrasts has its own, detection/fusion.py; the others this
        one-scan Detector); `options` are Detector's."""
        return DETECTORS.get(model.kind, Detector)(model, **options)

    @classmethod
    def from_request(cls, request: DetectionRequest, model: Optional[Model] = None) -> "Detector":
        model = model or resolve_model(request.model)
        return cls.for_model(model, device=request.device, preprocess_config=request.preprocess_config(model.meta),
                   postprocess_config=request.postprocess_config(model.meta), scorer_params=request.scorer_params(),
                   calibration=request.threshold.calibration)

    def _build_scorer(self, params: dict, device: str):
        try:
            return scorer_for_model(self.model, params, device)
        except (ValueError, KeyError) as exc:
            raise ModelError(f"model {self.model.name} cannot be used: {_message(exc)}") from None

    def check_modality(self, modality: Optional[str]) -> str:
        expected = self.model.modality
        if modality is None:
            return expected
        m = normalise_modality(modality)
        if m != expected:
            raise BadInputError(f"model {self.model.name} is for {expected} scans but the input is {m}; "
                                f"choose a {m} model (see 'brainanomaly models')")
        return m

    def score_grid(self, image: np.ndarray, mask: np.ndarray, reporter: Optional[Reporter] = None,
                   acquisition_mm: Optional[Sequence[float]] = None) -> GridScores:
        """Score a preprocessed grid volume and post-process the map; `acquisition_mm` is the input voxel's extent
        along the grid axes (Preprocessed.acquisition_mm), None for the grid's own."""
        out, notes = self._score(image, mask, reporter or Reporter(), acquisition_mm)
        return self.postprocess(out, mask, notes, acquisition_mm)

    def filtered(self, anomaly_map: np.ndarray, mask: np.ndarray,
                 acquisition_mm: Optional[Sequence[float]] = None) -> np.ndarray:
        """The raw map cleaned in template space as the model asks (postprocess.clean_in_template), not yet
        clipped."""
        try:
            return clean_in_template(anomaly_map, mask, self.postprocess_config, self.grid, acquisition_mm)
        except ValueError as exc:
            raise ModelError(f"model {self.model.name} cannot score this scan: {_message(exc)}") from None

    def small_lesion_zone(self, mask: np.ndarray) -> np.ndarray:
        try:
            return small_lesion_zone(mask, self.postprocess_config, self.grid)
        except ValueError as exc:
            raise ModelError(f"model {self.model.name} cannot score this scan: {_message(exc)}") from None

    def torch_device(self) -> Optional[str]:
        """The device of the torch pre- and post-processing, None for the CPU path (see `torch_ops`)."""
        return self.torch_ops or (self.device if self.device.startswith("cuda") else None)

    def postprocess(self, out: ScoreOutput, mask: np.ndarray, notes: Sequence[str] = (),
                    acquisition_mm: Optional[Sequence[float]] = None) -> GridScores:
        slab = slab_voxels(acquisition_mm, spacing_zyx(self.grid))
        if self.torch_device() is not None:
            from .torch_postprocess import postprocess

            contrasted = contralateral_difference(out.anomaly_map, self.postprocess_config.contralateral, self.grid)
            clean, eroded, stats = postprocess(contrasted, mask, self.postprocess_config, self.torch_device(), slab,
                                               self.small_lesion_zone(mask), acquisition_mm, self.grid)
            return GridScores(out.anomaly_map, clean, eroded, out.reconstruction, stats, list(notes))
        filtered = self.filtered(out.anomaly_map, mask, acquisition_mm)
        eroded = erode_mask(mask, self.postprocess_config, slab)
        return GridScores(out.anomaly_map, clip_to_mask(filtered, eroded), eroded, out.reconstruction,
                          robust_stats(filtered[eroded]), list(notes))

    def _score(self, image: np.ndarray, mask: np.ndarray, reporter: Reporter,
               acquisition_mm: Optional[Sequence[float]] = None):
        """The scorer's output, under the out-of-memory policy: only this step is retried (the preprocessed volume
        is kept), with half the batch each time down to one slice, then on the CPU. Returns (output, notes)."""
        first_device = self.device
        tried: List[Optional[int]] = []
        while True:
            self.scorer.acquisition_mm = acquisition_mm  # a rebuilt scorer scores the same scan
            try:
                out = score_once(self.scorer, image, mask, reporter)
                break
            except BrainAnomalyError:
                raise
            except (ValueError, KeyError) as exc:
                # Scorers report a model that does not fit its settings or this grid as ValueError.
                raise ModelError(f"model {self.model.name} cannot score this scan: {_message(exc)}") from None
            except Exception as exc:
                if not _out_of_memory(exc):
                    raise
                tried.append(self.scorer.batch_size())
            self._smaller_step(tried)
        notes = []
        if tried:
            sizes = ", ".join(str(b) for b in tried if b is not None)
            where = f"batch size {self.scorer.batch_size()} on {self.device}" if self.scorer.batch_size() else \
                self.device
            notes.append(f"out of memory on {first_device}" + (f" at batch size {sizes}" if sizes else "")
                         + f"; scored with {where} instead (preprocessing was kept)")
        return out, notes

    def _smaller_step(self, tried: List[Optional[int]]) -> None:
        """Rebuild the scorer for the next try after running out of memory, or give up with a clear message."""
        batch = tried[-1]
        if self.device.startswith("cuda"):
            import torch

            self.scorer = None  # release the model's GPU tensors before trying again
            torch.cuda.empty_cache()
        if batch is not None and batch > 1:
            self.scorer = self._build_scorer(dict(self.params, batch_size=max(1, batch // 2)), self.device)
        elif self.device != "cpu":
            # The CPU has the memory the GPU lacked; the batch the user asked for (or the scorer's own) is kept.
            self.device = "cpu"
            self.scorer = self._build_scorer(self.params, "cpu")
        else:
            raise OutOfMemoryError(f"out of memory on the CPU{' even at batch size 1' if batch else ''} while "
                                   f"scoring with model {self.model.name}; close other programs or use a machine "
                                   "with more memory")

    def analyse(self, native: sitk.Image, reporter: Optional[Reporter] = None,
                pre: Optional[Preprocessed] = None, declared: Optional[str] = None) -> GridAnalysis:
        """Preprocess (unless `pre` is given, e.g. shared by several scorers) and score on the model grid.
        `declared` is the modality the user gave, which overrides the contrast check."""
        reporter = reporter or Reporter()
        t = time.perf_counter()
        if pre is None:
            pre = self.preprocess_scan(native, self._loading_after_n4(reporter.sub(0.0, 0.8)))
            # contrast check (preprocess.contrast): refuses a scan of another contrast before it is scored
            pre.notes += check_contrast(pre.contrast, self.model.modality, declared, list_models, self.model.name)
        seconds = {"preprocess": time.perf_counter() - t}
        t = time.perf_counter()
        loading = self._loading
        self.prepare(reporter)
        # kept apart from scoring: on a first scan, what the loading of the networks (mostly the imports of torch
        # and MONAI) had left to do when the preprocessing ended; the loading's own time beside it
        seconds["load_networks"] = time.perf_counter() - t
        if loading is not None and loading.seconds is not None:
            seconds["load_networks_background"] = loading.seconds
        t = time.perf_counter()
        scores = self.score_grid(pre.image, pre.mask, reporter.sub(0.8, 0.95), pre.acquisition_mm)
        seconds["score+postprocess"] = time.perf_counter() - t
        return GridAnalysis(**vars(scores), pre=pre, seconds=seconds)

    def _loading_after_n4(self, reporter: Reporter) -> Reporter:
        """`reporter`, starting the networks' loading when the preprocessing reports its first step after the
        skull-strip and N4 (the registration): deepbet's arrays and the networks are then never held together (with
        the loading from the start, detect's peak memory with deepbet on a BraTS T1 rose from 1403-1427 to 1522-1531
        MB), and N4's two threads, which the loading slowed 1.3-1.9 times on 2 busy cores, keep the cores."""
        def progress(step: str, fraction: float) -> None:
            if step not in _BEFORE_TEMPLATE:
                self._warm_template()
            if step not in _BEFORE_LOADING:
                self.start_loading()
            reporter.progress(step, fraction)

        return Reporter(progress, reporter.cancel, reporter.lo, reporter.hi)

    def preprocess_scan(self, native: sitk.Image, reporter: Reporter) -> Preprocessed:
        """The model's preprocessing of a scan, running out of memory reported as such."""
        try:
            return preprocess(native, self.preprocess_config, self.grid, self.device.startswith("cuda"), reporter,
                              self.torch_device())
        except BrainAnomalyError:
            raise
        except Exception as exc:
            if not _out_of_memory(exc):
                raise
            raise OutOfMemoryError(f"out of memory on {self.device} while preprocessing; "
                                   + ("run with --device cpu" if self.device != "cpu" else
                                      "close other programs or use a machine with more memory")) from None

    def run_request(self, request: DetectionRequest, reporter: Optional[Reporter] = None) -> Tuple[Result, sitk.Image]:
        """Read the request's input and detect on it; returns the result and the scan read."""
        reporter = reporter or Reporter()
        if request.inputs:
            raise BadInputError(f"model {self.model.name} takes one {self.model.modality} scan; several contrasts "
                                "of one subject need a fusion model (see 'brainanomaly models')")
        self.check_modality(request.modality)
        t = request.threshold
        self.threshold(t.value, t.fpr, t.false_findings)  # a bad threshold fails before the reading
        if not request.input:
            raise BadInputError("the request names no input volume")
        read_notes: List[str] = []
        scan = read_volume(request.input, fill_nan=request.fill_nan, notes=read_notes)
        result = self.run(scan, request.modality, t.value, t.fpr, reporter, t.false_findings)
        result.notes[:0] = read_notes
        return result, scan

    def run(self, native: sitk.Image, modality: Optional[str] = None, threshold: Optional[float] = None,
            fpr: Optional[float] = None, reporter: Optional[Reporter] = None,
            false_findings: Optional[float] = None) -> Result:
        reporter = reporter or Reporter()
        declared, modality = modality, self.check_modality(modality)
        chosen = self.threshold(threshold, fpr, false_findings)
        started = time.perf_counter()
        analysis = self.analyse(native, reporter.sub(0.0, 0.9), declared=declared)
        result = self.to_result(native, analysis, self.for_scan(chosen, analysis), modality,
                                reporter.sub(0.9, 1.0))
        result.timings["total"] = round(time.perf_counter() - started, 3)
        return result

    def threshold(self, threshold: Optional[float] = None, fpr: Optional[float] = None,
                  false_findings: Optional[float] = None) -> Threshold:
        try:
            return choose_threshold(self.model.meta, threshold, fpr, false_findings)
        except ValueError as exc:
            raise BadInputError(str(exc)) from None

    def scan_move(self, stats: dict, reference: Optional[AdaptiveReference] = None) -> Optional[ScanMove]:
        """How a scan's scores (their robust `stats`) sit against the healthy cohort's (`reference`, default the
        model's), when calibration is scan-adaptive; None where thresholds stay as calibrated (cohort calibration,
        scores already relative to the scan, no reference)."""
        if self.calibration != "adaptive" or self.scorer.scan_relative:
            return None
        return ScanMove.between(reference or AdaptiveReference.from_meta(self.model.meta), stats)

    def for_scan(self, chosen: Threshold, scores: GridScores) -> Threshold:
        """The threshold for this scan: the cohort one, moved to the scan's own score distribution when the
        calibration is scan-adaptive."""
        if self.calibration == "adaptive" and self.scorer.scan_relative and chosen.fpr is not None:
            return chosen.noted("; scores are relative to the scan's own intensities, so already scan-adaptive")
        return chosen.moved(self.scan_move(scores.stats))

    def scan_curve(self, scores: GridScores) -> Optional[CalibrationCurve]:
        """The model's calibration curve for this scan (moved as `for_scan` moves thresholds); None if the model
        is uncalibrated."""
        curve = CalibrationCurve.from_meta(self.model.meta)
        return curve.moved(self.scan_move(scores.stats)) if curve is not None else None

    def to_result(self, native: sitk.Image, analysis: GridAnalysis, chosen: Threshold, modality: str,
                  reporter: Optional[Reporter] = None, with_reconstruction: bool = True) -> Result:
        """Back-project a grid analysis onto the input grid, threshold it and tabulate the lesions."""
        reporter = reporter or Reporter()
        pre = analysis.pre
        t = time.perf_counter()
        reporter("back-project", 0.0)
        native_mask = array_to_image(pre.native_mask.astype(np.uint8), native)
        heat = to_native(analysis.clean_map, pre, native, torch_device=self.torch_device())
        heat = sitk.Mask(heat, native_mask)
        recon = None
        if with_reconstruction and analysis.reconstruction is not None:
            # Show the pseudo-healthy image on the scan's own intensity scale: map the standardised scale linearly
            # so the brain's 1st and 99th percentiles match the original scan's (N4's field has an arbitrary
            # global scale, so the bias-corrected scale would not do).
            s_lo, s_hi = np.percentile(pre.image[pre.mask], [1, 99])
            n_lo, n_hi = np.percentile(sitk.GetArrayViewFromImage(native)[pre.native_mask], [1, 99])
            gain = (n_hi - n_lo) / max(s_hi - s_lo, 1e-6)
            recon = to_native(analysis.reconstruction, pre, native, torch_device=self.torch_device())
            recon = sitk.Mask(recon * float(gain) + float(n_lo - s_lo * gain), native_mask)
        scan_curve = self.scan_curve(analysis)
        curve = scan_curve.to_dict() if scan_curve is not None else None
        finding_cal = FindingCalibration.from_meta(self.model.meta)
        rule = None
        if chosen.false_findings is not None and scan_curve is not None and finding_cal is not None:
            rule = FindingRule(scan_curve, finding_cal, chosen.false_findings)
        pred_mask, lesions = label_lesions(heat, chosen.value, self.postprocess_config.min_lesion_ml, rule=rule)
        reporter("back-project", 1.0)
        seconds = dict(analysis.seconds, back_project=time.perf_counter() - t)
        for step in pre.record:
            seconds[f"preprocess.{step['step']}"] = step["seconds"]
        m = self.model
        peak = float(np.max(sitk.GetArrayViewFromImage(heat)))
        return Result(anomaly_map=heat, pred_mask=pred_mask, brain_mask=native_mask,
                      pred_score=scan_score(analysis.clean_map, analysis.scoring_mask), lesions=lesions,
                      threshold=chosen.to_dict(), min_lesion_ml=self.postprocess_config.min_lesion_ml,
                      modality=modality,
                      model={"name": m.name, "kind": m.kind, "version": m.meta.get("version"),
                             "modality": m.modality, "description": m.meta.get("description"), "path": str(m.path)},
                      preprocessing=pre.record, timings={k: round(v, 3) for k, v in seconds.items()},
                      reconstruction=recon, scan_curve=curve,
                      finding_calibration=finding_cal.to_dict() if finding_cal is not None else None,
                      display_range=display_range(curve, chosen.value, peak),
                      peak_score=peak, device=self.device, notes=list(pre.notes) + list(analysis.notes))


def display_range(curve: Optional[dict], threshold: float, peak: float) -> List[float]:
    """Heatmap window: from the chosen threshold up to the score healthy brains reach at the curve's smallest FPR
    (so colour means the same between scans of one model), widened to the scan's peak when that is below it."""
    hi = max(curve["threshold"]) if curve else peak
    if hi <= threshold:
        hi = max(peak, threshold + 1e-3)
    return [float(threshold), float(hi)]


def _out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")  # only a scorer that imported torch can raise its error
    if torch is not None and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _message(exc: BaseException) -> str:
    return str(exc).strip("'\"") or type(exc).__name__

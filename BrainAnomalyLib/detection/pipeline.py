"""Detection: one path from a volume on any grid to a Result on that same grid."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import SimpleITK as sitk

from ..calibration.curve import adapt_threshold, choose_threshold
from ..core.device import resolve_device
from ..core.errors import BadInputError
from ..core.io import array_to_image
from ..core.manifest import normalise_modality
from ..store.models import Model, list_models
from .postprocess import (PostprocessConfig, clip_to_mask, erode_mask, filter_map, label_lesions, robust_stats,
                          scan_score)
from ..preprocess.chain import PreprocessConfig, Preprocessed, preprocess, to_native
from ..preprocess.contrast import check_contrast
from ..core.progress import Reporter
from ..core.result import Result
from ..scorers import scorer_class
from ..core.template import Grid


CALIBRATIONS = ("adaptive", "cohort")


@dataclass
class GridScores:
    """A scorer's output on the model grid after post-processing."""

    raw_map: np.ndarray
    clean_map: np.ndarray  # filtered, clipped at 0, zero outside the scoring mask
    scoring_mask: np.ndarray  # the eroded brain mask
    reconstruction: Optional[np.ndarray]
    stats: dict  # robust location and spread of the filtered scores in the scoring mask


@dataclass
class GridAnalysis(GridScores):
    """Everything that happens on the model grid; evaluation and calibration stop here."""

    pre: Optional[Preprocessed] = None
    seconds: Optional[dict] = None


class Detector:
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
        params = dict(meta.get("params", {}), **(scorer_params or {}))
        self.scorer = scorer_class(model.kind)(params, model.tensors, self.device)

    def check_modality(self, modality: Optional[str]) -> str:
        expected = self.model.modality
        if modality is None:
            return expected
        m = normalise_modality(modality)
        if m != expected:
            raise BadInputError(f"model {self.model.name} is for {expected} scans but the input is {m}; "
                                f"choose a {m} model (see 'brainanomaly models')")
        return m

    def score_grid(self, image: np.ndarray, mask: np.ndarray, reporter: Optional[Reporter] = None) -> GridScores:
        """Score a preprocessed grid volume and post-process the map."""
        out = self.scorer.score(image, mask, reporter or Reporter())
        filtered = filter_map(out.anomaly_map, self.postprocess_config)
        eroded = erode_mask(mask, self.postprocess_config)
        return GridScores(out.anomaly_map, clip_to_mask(filtered, eroded), eroded, out.reconstruction,
                          robust_stats(filtered[eroded]))

    def analyse(self, native: sitk.Image, reporter: Optional[Reporter] = None,
                pre: Optional[Preprocessed] = None, declared: Optional[str] = None) -> GridAnalysis:
        """Preprocess (unless `pre` is given, e.g. shared by several scorers) and score on the model grid.
        `declared` is the modality the user gave, which overrides the contrast check."""
        reporter = reporter or Reporter()
        t = time.perf_counter()
        if pre is None:
            pre = preprocess(native, self.preprocess_config, self.grid, self.device.startswith("cuda"),
                             reporter.sub(0.0, 0.8))
            # contrast check (preprocess.contrast): refuses a scan of another contrast before it is scored
            pre.notes += check_contrast(pre.contrast, self.model.modality, declared, list_models, self.model.name)
        seconds = {"preprocess": time.perf_counter() - t}
        t = time.perf_counter()
        scores = self.score_grid(pre.image, pre.mask, reporter.sub(0.8, 0.95))
        seconds["score+postprocess"] = time.perf_counter() - t
        return GridAnalysis(**vars(scores), pre=pre, seconds=seconds)

    def run(self, native: sitk.Image, modality: Optional[str] = None, threshold: Optional[float] = None,
            fpr: Optional[float] = None, reporter: Optional[Reporter] = None) -> Result:
        reporter = reporter or Reporter()
        declared, modality = modality, self.check_modality(modality)
        chosen = self.threshold(threshold, fpr)
        started = time.perf_counter()
        analysis = self.analyse(native, reporter.sub(0.0, 0.9), declared=declared)
        result = self.to_result(native, analysis, self.for_scan(chosen, analysis), modality,
                                reporter.sub(0.9, 1.0))
        result.timings["total"] = round(time.perf_counter() - started, 3)
        return result

    def threshold(self, threshold: Optional[float] = None, fpr: Optional[float] = None) -> dict:
        try:
            return choose_threshold(self.model.meta, threshold, fpr)
        except ValueError as exc:
            raise BadInputError(str(exc)) from None

    def for_scan(self, chosen: dict, scores: GridScores) -> dict:
        """The threshold for this scan: the cohort one, moved to the scan's own score distribution when the
        calibration is scan-adaptive."""
        if self.calibration != "adaptive" or chosen.get("fpr") is None:
            return chosen
        if self.scorer.scan_relative:
            return dict(chosen, source=chosen["source"] + "; scores are relative to the scan's own intensities, "
                                                          "so already scan-adaptive")
        return adapt_threshold(self.model.meta, chosen, scores.stats)

    def to_result(self, native: sitk.Image, analysis: GridAnalysis, chosen: dict, modality: str,
                  reporter: Optional[Reporter] = None, with_reconstruction: bool = True) -> Result:
        """Back-project a grid analysis onto the input grid, threshold it and tabulate the lesions."""
        reporter = reporter or Reporter()
        pre = analysis.pre
        t = time.perf_counter()
        reporter("back-project", 0.0)
        native_mask = array_to_image(pre.native_mask.astype(np.uint8), native)
        heat = to_native(analysis.clean_map, pre, native)
        heat = sitk.Mask(heat, native_mask)
        recon = None
        if with_reconstruction and analysis.reconstruction is not None:
            # Show the pseudo-healthy image on the scan's own intensity scale: map the standardised scale linearly
            # so the brain's 1st and 99th percentiles match the original scan's (N4's field has an arbitrary
            # global scale, so the bias-corrected scale would not do).
            s_lo, s_hi = np.percentile(pre.image[pre.mask], [1, 99])
            n_lo, n_hi = np.percentile(sitk.GetArrayViewFromImage(native)[pre.native_mask], [1, 99])
            gain = (n_hi - n_lo) / max(s_hi - s_lo, 1e-6)
            recon = to_native(analysis.reconstruction, pre, native)
            recon = sitk.Mask(recon * float(gain) + float(n_lo - s_lo * gain), native_mask)
        pred_mask, lesions = label_lesions(heat, chosen["value"], self.postprocess_config.min_lesion_ml)
        reporter("back-project", 1.0)
        seconds = dict(analysis.seconds, back_project=time.perf_counter() - t)
        for step in pre.record:
            seconds[f"preprocess.{step['step']}"] = step["seconds"]
        m = self.model
        return Result(anomaly_map=heat, pred_mask=pred_mask, brain_mask=native_mask,
                      pred_score=scan_score(analysis.clean_map, analysis.scoring_mask), lesions=lesions,
                      threshold=chosen, min_lesion_ml=self.postprocess_config.min_lesion_ml, modality=modality,
                      model={"name": m.name, "kind": m.kind, "version": m.meta.get("version"), "path": str(m.path)},
                      preprocessing=pre.record, timings={k: round(v, 3) for k, v in seconds.items()},
                      reconstruction=recon, grid_map=analysis.clean_map, grid_mask=analysis.scoring_mask,
                      notes=list(pre.notes))

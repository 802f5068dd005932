"""Detection: one path from a volume on any grid to a Result on that same grid."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import SimpleITK as sitk

from .calibration import choose_threshold
from .device import resolve_device
from .errors import BadInputError
from .io import array_to_image
from .manifest import normalise_modality
from .models import Model
from .postprocess import PostprocessConfig, clean_map, label_lesions, scan_score
from .preprocess.chain import PreprocessConfig, Preprocessed, preprocess, to_native
from .preprocess.normalise import normalise
from .progress import Reporter
from .result import Result
from .scorers import scorer_class
from .template import Grid


@dataclass
class GridAnalysis:
    """Everything that happens on the model grid; evaluation and calibration stop here."""

    pre: Preprocessed
    raw_map: np.ndarray
    clean_map: np.ndarray
    scoring_mask: np.ndarray
    reconstruction: Optional[np.ndarray]
    seconds: dict


class Detector:
    def __init__(self, model: Model, device: str = "auto", preprocess_config: Optional[PreprocessConfig] = None,
                 postprocess_config: Optional[PostprocessConfig] = None, scorer_params: Optional[dict] = None):
        self.model = model
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

    def score_grid(self, image: np.ndarray, mask: np.ndarray, reporter: Optional[Reporter] = None):
        """Score a preprocessed grid volume: (raw map, cleaned map, scoring mask, reconstruction)."""
        out = self.scorer.score(image, mask, reporter or Reporter())
        cleaned, eroded = clean_map(out.anomaly_map, mask, self.postprocess_config)
        return out.anomaly_map, cleaned, eroded, out.reconstruction

    def analyse(self, native: sitk.Image, reporter: Optional[Reporter] = None,
                pre: Optional[Preprocessed] = None) -> GridAnalysis:
        """Preprocess (unless `pre` is given, e.g. shared by several scorers) and score on the model grid."""
        reporter = reporter or Reporter()
        t = time.perf_counter()
        if pre is None:
            pre = preprocess(native, self.preprocess_config, self.grid, self.device.startswith("cuda"),
                             reporter.sub(0.0, 0.8))
        seconds = {"preprocess": time.perf_counter() - t}
        t = time.perf_counter()
        raw, cleaned, eroded, recon = self.score_grid(pre.image, pre.mask, reporter.sub(0.8, 0.95))
        seconds["score+postprocess"] = time.perf_counter() - t
        return GridAnalysis(pre, raw, cleaned, eroded, recon, seconds)

    def run(self, native: sitk.Image, modality: Optional[str] = None, threshold: Optional[float] = None,
            fpr: Optional[float] = None, reporter: Optional[Reporter] = None) -> Result:
        reporter = reporter or Reporter()
        modality = self.check_modality(modality)
        chosen = self.threshold(threshold, fpr)
        started = time.perf_counter()
        analysis = self.analyse(native, reporter.sub(0.0, 0.9))
        result = self.to_result(native, analysis, chosen, modality, reporter.sub(0.9, 1.0))
        result.timings["total"] = round(time.perf_counter() - started, 3)
        return result

    def threshold(self, threshold: Optional[float] = None, fpr: Optional[float] = None) -> dict:
        try:
            return choose_threshold(self.model.meta, threshold, fpr)
        except ValueError as exc:
            raise BadInputError(str(exc)) from None

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
            # Undo the normalisation with the original scan's own brain statistics (N4's field has an arbitrary
            # global scale), so the pseudo-healthy image is shown on the scan's intensity scale.
            _, scan_scale = normalise(sitk.GetArrayViewFromImage(native), pre.native_mask,
                                      self.preprocess_config.normalisation)
            recon = to_native(analysis.reconstruction, pre, native)
            recon = sitk.Mask(recon * scan_scale["scale"] + scan_scale["offset"], native_mask)
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
                      reconstruction=recon, grid_map=analysis.clean_map, grid_mask=analysis.scoring_mask)

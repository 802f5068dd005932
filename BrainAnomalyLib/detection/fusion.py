"""Detection on several contrasts of one subject with a fusion model (scorers/fusion.py): the reference contrast
(T1 when given, else the first given) is preprocessed as any scan; the others reuse its
brain mask and template transform (preprocess.chain.preprocess_companion: one registration for the session); each
member model scores and post-processes its own contrast as it would alone, the fusion averages the maps on a common
scale, and the fused map is cleaned, thresholded, back-projected onto the reference scan's grid and calibrated like
any model's map."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk

from ..core.errors import BadInputError
from ..core.io import read_volume
from ..core.manifest import normalise_modality
from ..core.progress import Reporter
from ..core.result import Result
from ..core.template import spacing_zyx
from ..preprocess.chain import Preprocessed, preprocess_companion, standardise
from ..preprocess.contrast import check_contrast
from ..scorers import ScoreOutput
from .pipeline import DETECTORS, Detector, GridAnalysis, GridScores
from .postprocess import PostprocessConfig, erode_mask, robust_stats, slab_voxels
from .request import DetectionRequest

REFERENCE = "T1"  # registered first when given: the contrast with the sharpest grey/white boundary


def reference_contrast(given) -> str:
    """The contrast registered first, on whose grid the result lies: T1 when given, else the first given."""
    given = [normalise_modality(m) for m in given]
    return REFERENCE if REFERENCE in given else given[0]


class FusionDetector(Detector):
    """A Detector whose scan is a set of contrasts (modality -> volume) of one session."""

    def __init__(self, model, device: str = "auto", preprocess_config=None, postprocess_config=None,
                 scorer_params: Optional[dict] = None, calibration: str = "adaptive"):
        super().__init__(model, device, preprocess_config, postprocess_config, scorer_params, calibration)
        self.members: Dict[str, Detector] = {}
        for ref, member in zip(self.params["members"], model.members):
            own = member.meta.get("preprocessing", {})
            # One geometry for all (the fusion's, with the user's changes); each member's intensity scale its own.
            pre = replace(self.preprocess_config, normalisation=own.get("normalisation", "median-iqr"),
                          normalisation_reference=own.get("normalisation_reference"))
            post = PostprocessConfig(**dict(member.meta.get("postprocess", {}), **(ref.get("postprocess") or {})))
            self.members[ref["modality"]] = Detector(member, self.device, pre, post, scorer_params, calibration)

    @property
    def modalities(self) -> List[str]:
        return list(self.members)

    def inputs(self, given: Mapping[str, object]) -> Dict[str, object]:
        """The given contrasts keyed by normalised modality, checked against the model's: every required one
        there, none it does not know."""
        out = {}
        for m, v in given.items():
            m = normalise_modality(m)
            if m in out:
                raise BadInputError(f"{m} is given twice")
            out[m] = v
        unknown = [m for m in out if m not in self.members]
        if unknown:
            raise BadInputError(f"model {self.model.name} fuses {', '.join(self.modalities)}; it has no member for "
                                f"{', '.join(unknown)}")
        missing = [m for m in self.scorer.required if m not in out]
        if missing:
            raise BadInputError(f"model {self.model.name} needs {', '.join(missing)} too (it fuses "
                                f"{', '.join(self.modalities)}; {', '.join(self.optional) or 'none'} optional)")
        return out

    @property
    def optional(self) -> List[str]:
        return [m for m in self.modalities if m not in self.scorer.required]

    def reference_modality(self, given) -> str:
        return reference_contrast(given)

    def label(self, given) -> str:
        """The result's modality: the contrasts fused, in the model's order."""
        return "+".join(m for m in self.modalities if m in given)

    # -- one scan: refused, with what to give instead --
    def check_modality(self, modality: Optional[str]) -> str:
        if modality is not None:
            raise BadInputError(f"model {self.model.name} fuses {', '.join(self.modalities)}: give each contrast as "
                                "MODALITY=path instead of --modality")
        return self.label(self.modalities)

    def run(self, native, modality=None, threshold=None, fpr=None, reporter=None, false_findings=None) -> Result:
        raise BadInputError(f"model {self.model.name} fuses {', '.join(self.modalities)}: give each contrast as "
                            "MODALITY=path (e.g. T1=t1.nii.gz FLAIR=flair.nii.gz)")

    def analyse(self, native, reporter=None, pre=None, declared=None) -> GridAnalysis:
        return self.run(native)

    # -- several contrasts --
    def run_request(self, request: DetectionRequest, reporter: Optional[Reporter] = None) -> Tuple[Result, sitk.Image]:
        reporter = reporter or Reporter()
        if request.input:
            self.run(request.input)  # refuses one volume, saying what to give
        if request.modality is not None:
            self.check_modality(request.modality)
        t = request.threshold
        self.threshold(t.value, t.fpr, t.false_findings)  # a bad threshold fails before the reading
        paths = self.inputs(request.inputs or {})
        read_notes: Dict[str, List[str]] = {m: [] for m in paths}
        scans = {m: read_volume(p, fill_nan=request.fill_nan, notes=read_notes[m]) for m, p in paths.items()}
        result = self.run_contrasts(scans, t.value, t.fpr, reporter, t.false_findings)
        result.notes[:0] = [f"{m}: {n}" for m, notes in read_notes.items() for n in notes]
        return result, scans[self.reference_modality(scans)]

    def run_contrasts(self, scans: Mapping[str, sitk.Image], threshold: Optional[float] = None,
                      fpr: Optional[float] = None, reporter: Optional[Reporter] = None,
                      false_findings: Optional[float] = None) -> Result:
        """Detect on the contrasts of one session (modality -> volume); the result lies on the reference scan's
        grid."""
        reporter = reporter or Reporter()
        scans = self.inputs(scans)
        chosen = self.threshold(threshold, fpr, false_findings)
        started = time.perf_counter()
        analysis = self.analyse_contrasts(scans, reporter.sub(0.0, 0.9))
        native = scans[self.reference_modality(scans)]
        result = self.to_result(native, analysis, self.for_scan(chosen, analysis), self.label(scans),
                                reporter.sub(0.9, 1.0))
        result.timings["total"] = round(time.perf_counter() - started, 3)
        return result

    def analyse_contrasts(self, scans: Mapping[str, sitk.Image], reporter: Optional[Reporter] = None,
                          pre: Optional[Preprocessed] = None, companion: Optional[Callable] = None) -> GridAnalysis:
        """Preprocess the reference contrast (unless `pre`, its preprocessing, is given), bring the others onto
        its grid, score each with its member and fuse. The analysis's `pre` is the reference's, its record
        extended by the other contrasts' steps. `companion`: see grid_volumes."""
        reporter = reporter or Reporter()
        t = time.perf_counter()
        pre, images, acquisition = self.grid_volumes(scans, reporter.sub(0.0, 0.7), pre, companion)
        seconds = {"preprocess": time.perf_counter() - t}
        t = time.perf_counter()
        scores = self.score_grid(images, pre.mask, reporter.sub(0.7, 0.95), acquisition)
        seconds["score+postprocess"] = time.perf_counter() - t
        return GridAnalysis(**vars(scores), pre=pre, seconds=seconds)

    def grid_volumes(self, scans: Mapping[str, sitk.Image], reporter: Optional[Reporter] = None,
                     pre: Optional[Preprocessed] = None, companion: Optional[Callable] = None
                     ) -> Tuple[Preprocessed, Dict[str, np.ndarray], Dict[str, Optional[List[float]]]]:
        """Every contrast on the model grid through one registration: the reference's preprocessing (its record
        extended by the other contrasts' steps), each contrast's standardised grid volume and how far one of its
        voxels reaches along the grid axes (Preprocessed.acquisition_mm; a thick FLAIR beside a 1 mm T1). `companion`
        (modality, scan, reference preprocessing, reference scan, config, reporter) stands in for
        preprocess_companion with the same arguments after the modality (evaluation: store.cache.cached_companion)."""
        reporter = reporter or Reporter()
        scans = self.inputs(scans)
        ref = self.reference_modality(scans)
        if pre is None:
            pre = self.preprocess_scan(scans[ref], reporter.sub(0.0, 0.6))
        pre = replace(pre, record=[dict(s, contrast_of=ref) if "contrast_of" not in s else s for s in pre.record],
                      notes=list(pre.notes))
        others = [m for m in scans if m != ref]
        images = {ref: self._standardised(ref, pre)}
        acquisition = {ref: pre.acquisition_mm}
        for i, m in enumerate(others):
            args = (scans[m], pre, scans[ref], self.members[m].preprocess_config,
                    reporter.sub(0.6 + 0.4 * i / len(others), 0.6 + 0.4 * (i + 1) / len(others)))
            comp = companion(m, *args) if companion is not None else preprocess_companion(*args)
            pre.record += [dict(s, contrast_of=m) for s in comp.record]
            images[m] = comp.image
            acquisition[m] = comp.acquisition_mm
            pre.notes += check_contrast(comp.contrast, m, m, model_name=self.members[m].model.name)
        pre.notes += check_contrast(pre.contrast, ref, ref, model_name=self.members[ref].model.name)
        return pre, images, acquisition

    def _standardised(self, modality: str, pre: Preprocessed) -> np.ndarray:
        """The reference's grid volume on its member's intensity scale (the same as the fusion's unless they
        differ)."""
        config = self.members[modality].preprocess_config
        if config == self.preprocess_config or pre.raw_image is None:
            return pre.image
        return standardise(pre.raw_image, pre.mask, config, self.grid)[0]

    def score_grid(self, images, mask: np.ndarray, reporter: Optional[Reporter] = None,
                   acquisition_mm: Optional[Mapping[str, Optional[Sequence[float]]]] = None) -> GridScores:
        """Score each contrast's grid volume (modality -> volume, all on one grid and brain mask) with its member,
        post-process each map as the member would alone, fuse them and post-process the fused map.
        `acquisition_mm` (modality -> extent, grid_volumes) reaches each member as its own scan's; the fused map's
        region is eroded across the slices of the coarsest (postprocess.slab_voxels)."""
        if not isinstance(images, Mapping):
            return self.run(images)  # refuses one volume, saying what to give
        reporter = reporter or Reporter()
        images = self.inputs(images)
        acquisition = dict(acquisition_mm or {})
        maps, stats, notes = {}, {}, []
        for i, (m, image) in enumerate(images.items()):
            member = self.members[m]
            extent = acquisition.get(m)
            out, member_notes = member._score(image, mask, reporter.sub(i / len(images), (i + 1) / len(images)),
                                              extent)
            maps[m] = member.filtered(out.anomaly_map, mask, extent)
            slab = slab_voxels(extent, spacing_zyx(self.grid))
            stats[m] = robust_stats(maps[m][erode_mask(mask, member.postprocess_config, slab)])
            notes += [f"{m}: {n}" for n in member_notes]
        try:
            fused = self.scorer.fuse(maps, stats)
        except ValueError as exc:
            raise BadInputError(f"model {self.model.name}: {exc}") from None
        known = [np.asarray(e, float) for e in acquisition.values() if e is not None]
        coarsest = list(np.maximum.reduce(known)) if known else None
        return self.postprocess(ScoreOutput(fused), mask, notes, coarsest)


DETECTORS["fusion"] = FusionDetector

"""An ensemble of calibrated models scored as one: each member's map is put on a common scale (its healthy
cohort's robust location and spread) and the maps are averaged. Build one with `brainanomaly ensemble`; calibrate
it like any model. The ensemble stores no weights: it names each member by its installed id and the sha256 of the
member's folder (the digest the registry uses), and `models.load_model` finds and checks the members."""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from ..core.progress import Reporter
from .base import ScoreOutput, Scorer, register, scorer_class


@register
class EnsembleScorer(Scorer):
    kind = "ensemble"
    needs_tensors = False

    def __init__(self, params: dict, tensors: Dict[str, np.ndarray], device: str = "cpu",
                 members: Sequence[Scorer] = ()) -> None:
        super().__init__(params, tensors, device)
        if len(members) != len(self.params["members"]):
            raise ValueError(f"the ensemble names {len(self.params['members'])} members but got {len(members)} "
                             "scorers; load it with models.load_model")
        self.members = list(members)

    @classmethod
    def for_model(cls, model, params: dict, device: str = "cpu") -> "EnsembleScorer":

        # Settings given to the ensemble (e.g. a batch size after GPU out-of-memory) reach every member.
        shared = {k: v for k, v in params.items() if k in ("batch_size",)}
        members = [scorer_class(m.kind).for_model(m, dict(m.meta.get("params", {}), **shared), device)
                   for m in model.members]
        return cls(params, model.tensors, device, members)

    def batch_size(self) -> Optional[int]:
        sizes = [b for b in (m.batch_size() for m in self.members) if b is not None]
        return max(sizes) if sizes else None

    def score(self, image: np.ndarray, mask: np.ndarray, reporter: Reporter) -> ScoreOutput:
        total = np.zeros(image.shape, np.float64)
        recon = None
        weights = self.params.get("weights") or [1.0] * len(self.members)
        n = len(self.members)
        for i, (scorer, member, w) in enumerate(zip(self.members, self.params["members"], weights)):
            out = scorer.score(image, mask, reporter.sub(i / n, (i + 1) / n))
            scale = member["scale"]
            total += w * (out.anomaly_map - scale["median"]) / scale["mad"]
            if recon is None and out.reconstruction is not None:
                recon = out.reconstruction
        total /= float(sum(weights))
        return ScoreOutput(np.where(mask, total, 0.0).astype(np.float32), reconstruction=recon)

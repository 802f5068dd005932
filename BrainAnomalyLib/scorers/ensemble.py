"""An ensemble of calibrated models scored as one: each member's map is put on a common scale (its healthy
cohort's robust location and spread) and the maps are averaged. Build one with `brainanomaly ensemble`; calibrate
it like any model. The ensemble stores no weights: it names each member by its installed id and the sha256 of the
member's folder (the digest the registry uses), and `models.load_model` finds and checks the members."""

from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

from ..core.progress import Reporter
from .base import ScoreOutput, Scorer, register


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
        from . import scorer_class

        # Settings given to the ensemble (e.g. a batch size after GPU out-of-memory) reach every member.
        shared = {k: v for k, v in params.items() if k in ("batch_size",)}
        members = [scorer_class(m.kind).for_model(m, dict(m.meta.get("params", {}), **shared), device)
                   for m in model.members]
        return cls(params, model.tensors, device, members)

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


def build_ensemble(models: Sequence, weights: Sequence[float] = ()) -> dict:
    """The params of an ensemble of calibrated, installed models of one modality and grid."""
    from ..store.models import folder_digest, installed_id, user_models_dir

    if len(models) < 2:
        raise ValueError("an ensemble needs at least two models")
    modalities = {m.modality for m in models}
    if len(modalities) > 1:
        raise ValueError(f"ensemble members must share a modality (got {', '.join(sorted(modalities))})")
    for key, what in (("grid", "model grid"), ("preprocessing", "preprocessing (intensity standardisation "
                                                                       "included)")):
        # Keys set to None mean "not used" (older folders simply lack them).
        if len({repr(sorted((k, v) for k, v in (m.meta.get(key) or {}).items() if v is not None))
                for m in models}) > 1:
            raise ValueError(f"ensemble members must share their {what}")
    scales = []
    for m in models:
        if m.kind == "ensemble":
            raise ValueError(f"{m.name} is an ensemble itself; list its members instead")
        ref = ((m.meta.get("calibration") or {}).get("adaptive")) or {}
        if not ref.get("mad"):
            raise ValueError(f"model {m.name} has no healthy score statistics; calibrate it first")
        scales.append({"median": float(ref["median"]), "mad": float(ref["mad"])})
    members: List[dict] = []
    for m, scale in zip(models, scales):
        member_id = installed_id(m.path)
        if member_id is None:
            raise ValueError(f"model {m.path} is not installed; an ensemble names its members by id, so install it "
                             f"first (brainanomaly models import {m.path}, into {user_models_dir()})")
        members.append({"id": member_id, "sha256": folder_digest(m.path), "scale": scale})
    return {"members": members, "weights": [float(w) for w in weights] or None}

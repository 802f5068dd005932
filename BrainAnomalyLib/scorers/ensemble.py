"""An ensemble of calibrated models scored as one: each member's map is put on a common scale (its healthy
cohort's robust location and spread) and the maps are averaged. Build one with `brainanomaly ensemble`; calibrate
it like any model. Members' weights are stored in the ensemble's own safetensors (keys "m<i>.<name>"), so the
folder stands alone."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..core.progress import Reporter
from .base import ScoreOutput, Scorer, register


@register
class EnsembleScorer(Scorer):
    kind = "ensemble"
    needs_tensors = False

    def __init__(self, params: dict, tensors: Dict[str, np.ndarray], device: str = "cpu") -> None:
        super().__init__(params, tensors, device)
        from . import scorer_class

        self.members = []
        for i, member in enumerate(self.params["members"]):
            prefix = f"m{i}."
            sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            # Settings given to the ensemble (e.g. a batch size after GPU out-of-memory) reach every member.
            member_params = dict(member["params"], **{k: v for k, v in self.params.items()
                                                      if k in ("batch_size",)})
            self.members.append(scorer_class(member["kind"])(member_params, sub, device))

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


def build_ensemble(models: Sequence, weights: Sequence[float] = ()) -> Tuple[dict, Dict[str, np.ndarray]]:
    """(params, tensors) of an ensemble of calibrated models of one modality and grid."""
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
    members: List[dict] = []
    tensors: Dict[str, np.ndarray] = {}
    for i, m in enumerate(models):
        if m.kind == "ensemble":
            raise ValueError(f"{m.name} is an ensemble itself; list its members instead")
        ref = ((m.meta.get("calibration") or {}).get("adaptive")) or {}
        if not ref.get("mad"):
            raise ValueError(f"model {m.name} has no healthy score statistics; calibrate it first")
        members.append({"name": m.name, "kind": m.kind, "params": m.meta.get("params", {}),
                        "scale": {"median": float(ref["median"]), "mad": float(ref["mad"])}})
        tensors.update({f"m{i}.{k}": v for k, v in m.tensors.items()})
    params = {"members": members, "weights": [float(w) for w in weights] or None}
    return params, tensors

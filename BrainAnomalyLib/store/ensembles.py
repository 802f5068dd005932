"""Building an ensemble's parameters from installed, calibrated models: members are named by their registry id and
pinned by the sha256 of their folder (the scorer in scorers/ensemble.py loads them back)."""

from __future__ import annotations

from typing import List, Sequence

from ..core.files import folder_digest
from .models import installed_id, user_models_dir


def build_ensemble(models: Sequence, weights: Sequence[float] = (), rule: str = "mean",
                   contralateral: float = 0.0) -> dict:
    """The params of an ensemble of calibrated, installed models of one modality and grid (scorers/ensemble.py
    says what `rule` and `contralateral` do)."""
    from ..scorers.ensemble import RULES

    if rule not in RULES:
        raise ValueError(f"unknown ensemble rule {rule!r}; choose from {', '.join(RULES)}")
    if not 0.0 <= contralateral < 1.0:
        raise ValueError(f"contralateral weight {contralateral} is outside [0, 1)")
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
    out = {"members": members, "weights": [float(w) for w in weights] or None}
    if rule != "mean":
        out["rule"] = rule
    if contralateral:
        out["contralateral"] = float(contralateral)
    return out

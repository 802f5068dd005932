"""Building an ensemble's (or a fusion's) parameters from installed, calibrated models: members are named by their
registry id and pinned by the sha256 of their folder (scorers/ensemble.py and scorers/fusion.py use them)."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

from ..core.files import folder_digest
from ..core.manifest import normalise_modality
from .models import COMPOSITE_KINDS, installed_id, user_models_dir


def build_ensemble(models: Sequence, weights: Sequence[float] = (), rule: str = "mean",
                   contralateral: float = 0.0, power: float = 2.0, knees: Sequence[float] = ()) -> dict:
    """The params of an ensemble of calibrated, installed models of one modality and grid (scorers/ensemble.py
    says what `rule`, `contralateral`, `power` and `knees` do)."""
    from ..scorers.ensemble import check_rule

    check_rule(rule, power, knees, len(models))
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
        if m.kind in COMPOSITE_KINDS:
            raise ValueError(f"{m.name} is an {m.kind} itself; list its members instead")
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
    if power != 2.0:  # absent means 2, so an ensemble built before the setting existed scores as it did
        out["power"] = float(power)
    if any(knees):  # absent means no knee, as for ensembles built before the setting existed
        out["knees"] = [float(t) for t in knees]
    if contralateral:
        out["contralateral"] = float(contralateral)
    return out


def build_fusion(members: Sequence[Tuple[str, object]], weights: Sequence[float] = (), scale: str = "scan",
                 postprocess: Sequence[Optional[dict]] = (), optional: Sequence[str] = (), rule: str = "mean",
                 power: float = 2.0) -> dict:
    """The params of a fusion of installed models, one per contrast: `members` are (modality, model) pairs,
    `postprocess` per member changes to its own post-processing (e.g. a contralateral weight), `optional` the
    contrasts a scan may lack, `rule` and `power` how the maps are put together (scorers.fusion). With scale
    "healthy" each member needs its healthy score statistics."""
    if len(members) < 2:
        raise ValueError("a fusion needs at least two contrasts")
    modalities = [normalise_modality(m) for m, _ in members]
    if len(set(modalities)) < len(modalities):
        raise ValueError("a fusion has one member per contrast")
    out = []
    for n, (modality, m) in enumerate(members):
        if m.modality != modality:
            raise ValueError(f"{m.name} is a {m.modality} model, not a {modality} one")
        if m.kind in COMPOSITE_KINDS:
            raise ValueError(f"{m.name} is an {m.kind} itself")
        member_id = installed_id(m.path)
        if member_id is None:
            raise ValueError(f"model {m.path} is not installed; a fusion names its members by id")
        ref = {"id": member_id, "sha256": folder_digest(m.path), "modality": modality}
        ref_stats = ((m.meta.get("calibration") or {}).get("adaptive")) or {}
        if ref_stats.get("mad"):
            ref["scale"] = {"median": float(ref_stats["median"]), "mad": float(ref_stats["mad"])}
        elif scale == "healthy":
            raise ValueError(f"model {m.name} has no healthy score statistics; calibrate it first")
        if n < len(postprocess) and postprocess[n]:
            ref["postprocess"] = dict(postprocess[n])
        if modality in {normalise_modality(o) for o in optional}:
            ref["optional"] = True
        out.append(ref)
    if "T1" in modalities[1:]:
        # T1, when a member, is the reference contrast (detection.fusion.reference_contrast), and the first member
        # is the model's modality: the contrast whose rows a manifest is evaluated on.
        raise ValueError("list the T1 member first: it is the fusion's reference contrast")
    if all(r.get("optional") for r in out):
        raise ValueError("at least one contrast of a fusion must be required")
    from ..scorers.ensemble import check_rule

    check_rule(rule, power)
    params = {"members": out, "weights": [float(w) for w in weights] or None, "scale": scale}
    if rule != "mean":  # a mean fusion's params stay as they were before the rms rule (same folder digest)
        params.update(rule=rule, power=float(power))
    return params

"""An ensemble of calibrated models scored as one. Build one with `brainanomaly ensemble`; calibrate it like any
model. The ensemble stores no weights: it names each member by its installed id and the sha256 of the member's
folder (the digest the registry uses), and `models.load_model` finds and checks the members.

Two rules put the members' maps together:
  mean  each member's map on its healthy cohort's robust scale (location and spread), weighted mean;
  rms   each member's map on this scan's own robust scale (median and MAD in the brain), then the weighted root
        mean square of the positive parts. A lesion that only one member sees (e.g. a hyperintense blob only the
        perceptual AE scores, a small hypointense one the voxel-wise normative model finds best) keeps most of its
        score instead of being averaged away, and a member whose whole map shifts on another scanner is rescaled.
        Measured on the template grid (AUPRC on brats18_dev T1 / synthetic hyper blobs / hypo blobs / stroke) for
        dpa + cae + 0.5 x normative, mirrored: mean 0.46 / 0.08 / 0.52 / 0.38 against rms 0.46 / 0.53 / 0.61 / 0.34.
With `contralateral` set, each member's map first has that share of its mirror image taken off
(core.template.contralateral_difference); the rms rule is not linear, so this happens before the members meet.
`power` (rms only, default 2) is the p of the weighted power mean of the positive parts: a larger p lets the
member that sees a voxel most decide it more, p -> 1 lets members that agree add up.
`knees` (rms only, one per member, default 0) take each member's part as max(z - t, 0) for its knee t (in units of
the scan's MAD) before weights and power: a member with a knee adds to a voxel only where it is clearly anomalous, so
its many weak, diffuse responses (the normative model's, across a glioma's surroundings) stop diluting the others
while its strong ones still count. The map is then
    (sum_i w_i * max(z_i - t_i, 0)^p / sum_i w_i)^(1/p).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np

from ..core.progress import Reporter
from ..core.template import Grid, contralateral_difference
from .base import ScoreOutput, Scorer, register
from .reuse import score_once, scorer_for_model

RULES = ("mean", "rms")


def check_rule(rule: str, power: float = 2.0, knees: Optional[Sequence[float]] = None,
               members: Optional[int] = None) -> None:
    """Refuse (ValueError) a rule, power or knees the ensemble cannot score with: one check for building and
    loading."""
    if rule not in RULES:
        raise ValueError(f"unknown ensemble rule {rule!r}; choose from {', '.join(RULES)}")
    if not power >= 1.0:
        raise ValueError(f"ensemble power {power} is below 1")
    if power != 2.0 and rule != "rms":
        raise ValueError("a power other than 2 is a setting of the rms rule")
    if knees:
        if rule != "rms":
            raise ValueError("knees are a setting of the rms rule")
        if members is not None and len(knees) != members:
            raise ValueError(f"{len(knees)} knees for {members} members")
        bad = [t for t in knees if not 0.0 <= float(t) < float("inf")]
        if bad:
            raise ValueError(f"ensemble knee {bad[0]} is not a finite number >= 0")


@register
class EnsembleScorer(Scorer):
    kind = "ensemble"
    needs_tensors = False

    def __init__(self, params: dict, tensors: Dict[str, np.ndarray], device: str = "cpu",
                 members: Sequence[Scorer] = (), grid: Optional[Grid] = None) -> None:
        super().__init__(params, tensors, device)
        if len(members) != len(self.params["members"]):
            raise ValueError(f"the ensemble names {len(self.params['members'])} members but got {len(members)} "
                             "scorers; load it with models.load_model")
        check_rule(self.rule, float(self.params.get("power") or 2.0), self.params.get("knees"), len(members))
        if self.params.get("contralateral") and grid is None:
            raise ValueError("an ensemble with a contralateral weight needs its grid")
        self.members = list(members)
        self.grid = grid

    @property
    def rule(self) -> str:
        return self.params.get("rule") or "mean"

    @classmethod
    def for_model(cls, model, params: dict, device: str = "cpu") -> "EnsembleScorer":

        # Settings given to the ensemble (e.g. a batch size after GPU out-of-memory) reach every member.
        shared = {k: v for k, v in params.items() if k in ("batch_size",)}
        members = [scorer_for_model(m, dict(m.meta.get("params", {}), **shared), device) for m in model.members]
        return cls(params, model.tensors, device, members, Grid.from_dict(model.meta["grid"]))

    def batch_size(self) -> Optional[int]:
        sizes = [b for b in (m.batch_size() for m in self.members) if b is not None]
        return max(sizes) if sizes else None

    def prepare(self) -> None:
        for member in self.members:
            member.prepare()

    def score(self, image: np.ndarray, mask: np.ndarray, reporter: Reporter) -> ScoreOutput:
        maps = []
        recon = None
        n = len(self.members)
        for i, scorer in enumerate(self.members):
            scorer.acquisition_mm = self.acquisition_mm  # the scan's, as a member scored on its own would get
            out = score_once(scorer, image, mask, reporter.sub(i / n, (i + 1) / n))
            maps.append(out.anomaly_map)
            if recon is None and out.reconstruction is not None:
                recon = out.reconstruction
        return ScoreOutput(combine(maps, mask, self.params, self.grid), reconstruction=recon)


def combine(member_maps: Sequence[np.ndarray], mask: np.ndarray, params: dict, grid: Grid) -> np.ndarray:
    """The ensemble's map from its members' raw maps (in the order of params["members"])."""
    return fuse(member_parts(member_maps, mask, params, grid), mask, params)


def member_parts(member_maps: Sequence[np.ndarray], mask: np.ndarray, params: dict, grid: Grid) -> list:
    """Each member's map mirrored and put on the rule's scale, before knees, weights and power: kept apart so a
    search over those (scripts/ensemble_settings_loo.py) computes the parts of a scan once."""
    rule = params.get("rule") or "mean"
    parts = []
    for raw, member in zip(member_maps, params["members"]):
        member_map = contralateral_difference(raw, float(params.get("contralateral") or 0.0), grid)
        if rule == "mean":
            scale = member["scale"]
            parts.append((member_map - scale["median"]) / scale["mad"])
        else:
            parts.append(np.maximum(_scan_z(member_map, mask), 0.0))
    return parts


def fuse(parts: Sequence[np.ndarray], mask: np.ndarray, params: dict) -> np.ndarray:
    """The weighted mean (rule mean) or weighted power mean (rule rms) of the members' parts, each rms part past its
    member's knee."""
    rms = (params.get("rule") or "mean") == "rms"
    power = float(params.get("power") or 2.0)
    weights = params.get("weights") or [1.0] * len(parts)
    knees = params.get("knees") or [0.0] * len(parts)
    total = np.zeros(mask.shape, np.float64)
    for part, w, knee in zip(parts, weights, knees):
        if rms and knee:
            part = np.maximum(part - float(knee), 0.0)
        total += w * (part ** power if rms else part)
    total /= float(sum(weights))
    if rms:
        total = np.sqrt(total) if power == 2.0 else total ** (1.0 / power)
    return np.where(mask, total, 0.0).astype(np.float32)


def _scan_z(member_map: np.ndarray, mask: np.ndarray) -> np.ndarray:
    values = member_map[mask]
    if values.size == 0:
        return np.zeros_like(member_map)
    med = float(np.median(values))
    mad = float(np.median(np.abs(values - med)))
    return (member_map - med) / max(mad, 1e-6)

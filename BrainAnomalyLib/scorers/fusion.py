"""A fusion of several contrasts of one subject: one member model per contrast, each scoring its own contrast of the
same registered scan (one brain mask, one template transform), each member's post-processed map put on a common
scale and the maps put together with the fusion's weights by its rule: "mean" (default) the weighted mean, "rms"
the weighted power mean (`power`, default 2) of their positive parts, the T1 ensemble's rule (scorers.ensemble.fuse):
a lesion only one contrast shows keeps more of its score instead of being pulled down by contrasts that see nothing
there. Like an ensemble it stores no weights of its own: it names
each member by installed id and folder sha256 (models.load_model finds and checks them) and says which contrast
the member scores. Detection (detection/fusion.py) runs the members and calls `fuse`; the fused map is then
post-processed, thresholded and calibrated like any model's."""

from __future__ import annotations

from typing import Dict, List, Mapping

import numpy as np

from ..core.progress import Reporter
from .base import ScoreOutput, Scorer, register
from .ensemble import check_rule
from .ensemble import fuse as power_mean

# How a member's map is put on the common scale: "scan" uses the scan's own robust location and spread of the
# member's post-processed scores (each contrast then says how far a voxel stands out of this brain); "healthy"
# uses the member's healthy cohort scale (its calibration's adaptive median and MAD).
SCALES = ("scan", "healthy")


@register
class FusionScorer(Scorer):
    kind = "fusion"
    needs_tensors = False

    def __init__(self, params: dict, tensors: Dict[str, np.ndarray], device: str = "cpu") -> None:
        super().__init__(params, tensors, device)
        members = self.params.get("members")
        if not isinstance(members, list) or len(members) < 2:
            raise ValueError("a fusion model names at least two member models")
        if self.params.get("scale", "scan") not in SCALES:
            raise ValueError(f"unknown fusion scale {self.params.get('scale')!r}; choose from {', '.join(SCALES)}")
        self.scan_relative = self.params.get("scale", "scan") == "scan"
        self.rule = self.params.get("rule") or "mean"
        self.power = float(self.params.get("power") or 2.0)
        check_rule(self.rule, self.power)

    @property
    def modalities(self) -> List[str]:
        return [m["modality"] for m in self.params["members"]]

    @property
    def required(self) -> List[str]:
        return [m["modality"] for m in self.params["members"] if not m.get("optional")]

    def score(self, image: np.ndarray, mask: np.ndarray, reporter: Reporter) -> ScoreOutput:
        raise ValueError(f"a fusion model scores {', '.join(self.modalities)} together; give each contrast "
                         "(brainanomaly detect MODALITY=path ...)")

    def fuse(self, maps: Mapping[str, np.ndarray], stats: Mapping[str, dict]) -> np.ndarray:
        """The members' post-processed maps (by modality; a missing optional member is left out and the weights of
        the others renormalised), each on the common scale, put together by the rule; `stats` holds each map's
        robust median and MAD on this scan (detection.postprocess.robust_stats)."""
        weights = self.params.get("weights") or [1.0] * len(self.params["members"])
        parts, used = [], []
        for member, w in zip(self.params["members"], weights):
            m = member["modality"]
            if m not in maps or w == 0:
                continue
            parts.append(common_scale(maps[m], stats[m] if self.scan_relative else member["scale"]))
            used.append(w)
        if not parts:
            raise ValueError("none of the fusion's weighted contrasts was given")
        if self.rule == "rms":
            return power_mean([np.maximum(z, 0.0) for z in parts], np.ones(parts[0].shape, bool),
                              {"rule": "rms", "power": self.power, "weights": used})
        # The mean is summed in float32, as the fusions shipped before the rms rule were measured.
        total = used[0] * parts[0]
        for w, z in zip(used[1:], parts[1:]):
            total = total + w * z
        return (total / np.float32(sum(used))).astype(np.float32)


def common_scale(member_map: np.ndarray, scale: Mapping[str, float]) -> np.ndarray:
    """A member's post-processed map in robust units of `scale` (its median and MAD on this scan, or its healthy
    cohort's): what the fusion puts together."""
    return (member_map - np.float32(scale["median"])) / np.float32(max(scale["mad"], 1e-6))

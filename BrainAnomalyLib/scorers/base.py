"""The one interface every anomaly scorer implements, and the registry that finds them by name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple, Type

import numpy as np

from ..core.progress import Reporter

# Which way a lesion departs from healthy tissue, per contrast (Meissen et al. 2021; FINDINGS on T1 glioma).
DEFAULT_DIRECTION = {"T1": "hypo", "T1CE": "two-sided", "T2": "hyper", "FLAIR": "hyper", "PD": "hyper"}
DIRECTIONS = ("hyper", "hypo", "two-sided")


def direction_for(modality: str) -> str:
    return DEFAULT_DIRECTION.get(modality.upper(), "two-sided")


def signed(deviation: np.ndarray, direction: str) -> np.ndarray:
    """Turn a signed deviation (observed - expected) into an anomaly score where larger means more anomalous."""
    if direction == "hyper":
        return deviation
    if direction == "hypo":
        return -deviation
    if direction == "two-sided":
        return np.abs(deviation)
    raise ValueError(f"unknown direction {direction!r}; choose from {DIRECTIONS}")


@dataclass
class ScoreOutput:
    anomaly_map: np.ndarray  # grid (z,y,x) float32, larger = more anomalous
    reconstruction: Optional[np.ndarray] = None  # pseudo-healthy image on the grid, when the scorer has one


class Scorer:
    """Build from a model's metadata and tensors; `score` maps a preprocessed grid volume to an anomaly map."""

    kind: str = ""
    needs_tensors: bool = False
    # Scores measured against the scan's own intensity distribution already carry their own scan adaptation;
    # moving the threshold again would only let a lesion's share of the brain inflate the spread estimate.
    scan_relative: bool = False
    # Diffusion scorers run a network many times per slice: minutes per scan on a CPU where the others take seconds.
    diffusion: bool = False

    def __init__(self, params: dict, tensors: Dict[str, np.ndarray], device: str = "cpu") -> None:
        self.params = dict(params)
        self.tensors = tensors
        self.device = device
        # The scan being scored's voxel extent along the grid axes (z, y, x; mm; Preprocessed.acquisition_mm),
        # set by the detector per scan; None = the grid's own. Only scorers that model partial volume read it.
        self.acquisition_mm: Optional[Sequence[float]] = None

    @classmethod
    def for_model(cls, model, params: dict, device: str = "cpu") -> "Scorer":
        """The scorer of a loaded model (models.Model), run with `params` (its own, or overridden)."""
        return cls(params, model.tensors, device)

    def score(self, image: np.ndarray, mask: np.ndarray, reporter: Reporter) -> ScoreOutput:
        raise NotImplementedError

    def prepare(self) -> None:
        """Load what scoring will need (a network and its libraries) before the first scan; scorers that need
        nothing beyond their tensors do nothing."""

    def batch_size(self) -> Optional[int]:
        """Slices per forward pass, for scorers whose memory use grows with it (the out-of-memory policy halves
        it); None for scorers that do not batch."""
        return None

    @classmethod
    def fit(cls, samples: Iterable[Tuple[np.ndarray, np.ndarray]], params: dict,
            reporter: Reporter) -> Tuple[dict, Dict[str, np.ndarray]]:
        """Learn from healthy (image, mask) grid volumes; return (params, tensors) for the model folder."""
        raise NotImplementedError(f"scorer {cls.kind!r} is not trainable")


SCORERS: Dict[str, Type[Scorer]] = {}


def register(cls: Type[Scorer]) -> Type[Scorer]:
    SCORERS[cls.kind] = cls
    return cls


def scorer_class(kind: str) -> Type[Scorer]:
    """The registered scorer of `kind` (KeyError if none). Each scorer module registers its classes when imported
    and the package's __init__ imports them all, which Python does before it runs any module of the package, so
    the table is complete whenever this runs."""
    if kind not in SCORERS:
        raise KeyError(kind)
    return SCORERS[kind]

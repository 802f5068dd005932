"""One scan's scorer outputs reused across the scorers that score it together.

An evaluation scores every scan with several models, and an ensemble's members are usually among them (the
benchmark scores dpa-t1-ixi and cae-t1-ixi alone and again inside both T1 ensembles). The same model with the same
settings on the same grid volume gives the same map, so inside `shared_scores()` each such output is computed once
and handed out again read-only. Outside it, `score_once` is a plain `Scorer.score`.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional

import numpy as np

from ..core.progress import Reporter
from .base import ScoreOutput, Scorer, scorer_class


@dataclass
class SharedScores:
    outputs: Dict[tuple, tuple] = field(default_factory=dict)  # key -> (output, seconds it took)
    # Seconds the scorers would have spent computing what they were handed: callers that report a scorer's time
    # per scan add them, so reuse does not make one scorer look cheaper than it is on its own.
    reused_seconds: float = 0.0


_ACTIVE: Optional[SharedScores] = None


@contextlib.contextmanager
def shared_scores() -> Iterator[SharedScores]:
    """Scope (one scan) within which equal scorers on the same volume score once."""
    global _ACTIVE
    previous, _ACTIVE = _ACTIVE, SharedScores()
    try:
        yield _ACTIVE
    finally:
        _ACTIVE = previous


def identify(scorer: Scorer, model) -> Scorer:
    """Mark `scorer` with what decides its output: the model's files (their sha256) and its settings. A model
    without files (a scorer built in memory) is never reused."""
    files = model.meta.get("files")
    scorer.identity = (model.kind, json.dumps(files, sort_keys=True),
                       json.dumps(scorer.params, sort_keys=True, default=str)) if files else None
    return scorer


def scorer_for_model(model, params: dict, device: str) -> Scorer:
    """The scorer of `model` with `params` on `device`, identified for reuse: a model scored alone and as an
    ensemble member must carry the same identity, so both are built here."""
    return identify(scorer_class(model.kind).for_model(model, params, device), model)


def score_once(scorer: Scorer, image: np.ndarray, mask: np.ndarray, reporter: Reporter) -> ScoreOutput:
    identity = getattr(scorer, "identity", None)
    if _ACTIVE is None or identity is None:
        return scorer.score(image, mask, reporter)
    acquisition = None if scorer.acquisition_mm is None else tuple(float(a) for a in scorer.acquisition_mm)
    # The arrays themselves are held in the value, so their ids cannot be reused by others while the scope lasts.
    key = (identity, scorer.device, acquisition, id(image), id(mask))
    if key in _ACTIVE.outputs:
        out, seconds = _ACTIVE.outputs[key][:2]
        _ACTIVE.reused_seconds += seconds
        return out
    t = time.perf_counter()
    out = scorer.score(image, mask, reporter)
    for array in (out.anomaly_map, out.reconstruction):
        if array is not None:
            array.setflags(write=False)  # handed to several scorers: none may change it in place
    _ACTIVE.outputs[key] = (out, time.perf_counter() - t, image, mask)
    return out

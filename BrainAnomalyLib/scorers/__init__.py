"""Anomaly scorers, registered by name. A new method is a new module here that calls `register`, imported below."""

from . import ensemble, fusion, intensity, learned, normative, tissue  # noqa: F401  (importing registers them)
from .base import SCORERS, ScoreOutput, Scorer, direction_for, register, scorer_class  # noqa: F401

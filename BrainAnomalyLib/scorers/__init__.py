"""Anomaly scorers, registered by name. A new method is a new module here that calls `register`."""

from .base import SCORERS, ScoreOutput, Scorer, direction_for, register, scorer_class  # noqa: F401

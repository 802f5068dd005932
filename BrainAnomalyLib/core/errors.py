"""Exceptions that carry the CLI exit code, so every entry point reports failures the same way."""


class BrainAnomalyError(Exception):
    exit_code = 1


class BadInputError(BrainAnomalyError):
    """The user's scan or manifest cannot be processed (exit 2)."""

    exit_code = 2


class ModelError(BrainAnomalyError):
    """A model is missing, broken, tampered with or incompatible (exit 3)."""

    exit_code = 3


class Cancelled(BrainAnomalyError):
    """The user cancelled a running job (exit 130, as for Ctrl-C)."""

    exit_code = 130


class OutOfMemoryError(BrainAnomalyError):
    """Memory ran out even after the detection's own fallbacks (smallest batch, then the CPU) (exit 4)."""

    exit_code = 4

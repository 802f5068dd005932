"""Choosing where tensors run: CUDA when asked for and present, else CPU."""

from __future__ import annotations

from .errors import BadInputError

CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> str:
    if name not in CHOICES and not name.startswith("cuda:"):
        raise BadInputError(f"unknown device {name!r}; choose from {', '.join(CHOICES)}")
    if name == "cpu":
        return "cpu"
    import torch

    available = torch.cuda.is_available()
    if name == "auto":
        return "cuda" if available else "cpu"
    if not available:
        raise BadInputError(f"device {name} requested but no CUDA GPU is available; use --device cpu or auto")
    return name

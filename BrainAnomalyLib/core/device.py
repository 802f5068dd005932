"""Choosing where tensors run: CUDA when asked for and present, else CPU."""

from __future__ import annotations

import os
import sys

from .background import settle
from .errors import BadInputError

CHOICES = ("auto", "cpu", "cuda")
# What a Linux host with a GPU torch could use has: the NVIDIA driver, WSL's GPU device, AMD's ROCm device.
GPU_DEVICE_FILES = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def gpu_possible() -> bool:
    """False where no GPU can be there, found without importing torch (seconds): "auto" then means the CPU, and
    torch is imported later, on the thread that loads the networks while the scan is preprocessed."""
    if sys.platform == "darwin":
        return False  # torch has no CUDA on macOS
    if sys.platform.startswith("linux"):
        return any(os.path.exists(f) for f in GPU_DEVICE_FILES)
    return True


def resolve_device(name: str = "auto") -> str:
    if name not in CHOICES and not name.startswith("cuda:"):
        raise BadInputError(f"unknown device {name!r}; choose from {', '.join(CHOICES)}")
    if name == "cpu" or (name == "auto" and not gpu_possible()):
        return "cpu"
    settle()  # torch is not imported while a background thread may be importing it
    import torch

    available = torch.cuda.is_available()
    if name == "auto":
        return "cuda" if available else "cpu"
    if not available:
        raise BadInputError(f"device {name} requested but no CUDA GPU is available; use --device cpu or auto")
    return name

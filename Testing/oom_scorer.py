"""Test-only scorer kinds for the out-of-memory policy, registered on import. Imported by
test_detection_contract.py and, through `python -c "import oom_scorer; ..."`, by the worker processes it starts.

oom-probe: the real intensity scorer, except that scoring more than LIMIT slices at a time raises the error PyTorch
raises when the GPU runs out of memory (as a learned scorer's forward pass would).
oom-gpu: the intensity scorer that runs out of GPU memory at any batch size on a CUDA device.
oom-always: runs out of host memory (MemoryError) wherever it runs.
"""

from __future__ import annotations

import torch

from BrainAnomalyLib.scorers.base import register
from BrainAnomalyLib.scorers.intensity import IntensityScorer

LIMIT = 4


class _Batched(IntensityScorer):
    def batch_size(self) -> int:
        return int(self.params.get("batch_size") or 32)


@register
class OutOfMemoryProbe(_Batched):
    kind = "oom-probe"

    def score(self, image, mask, reporter):
        if self.batch_size() > LIMIT:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (batch {self.batch_size()} > {LIMIT})")
        return super().score(image, mask, reporter)


@register
class GpuOutOfMemory(_Batched):
    kind = "oom-gpu"

    def score(self, image, mask, reporter):
        if self.device.startswith("cuda"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return super().score(image, mask, reporter)


@register
class HostOutOfMemory(_Batched):
    kind = "oom-always"

    def score(self, image, mask, reporter):
        raise MemoryError()

"""A training pack: the standardised grid volumes of a training split in one small file, to train the networks on a
machine that has neither the scans nor the preprocessing (a lent GPU host: scripts/gpu_train.sh).

One compressed .npz (numpy only to read: no SimpleITK, no pickle):

    meta        JSON: format, the model meta fields the volumes were made under (template, grid, preprocessing,
                postprocess), the manifest's training record (see training/meta.py), the subjects and each one's
                part ("fit": trained on, "validation": early stopping)
    masks       (N, ceil(Z*Y*X / 8)) uint8: each brain mask, bit-packed
    values      uint8: each volume's voxels inside its mask, volume after volume, as 256 even steps from the
                volume's brain minimum to its maximum
    low, step   (N,) float32: each volume's brain minimum and step (value = low + step * code)
    outside     (N,) float32: each volume's value outside its mask (standardisation leaves one constant there)

Quantising the brain to 8 bits is what fits a 70-scan training split into about 14 MiB, so that it travels to a
lent GPU host beside the project's tree (64 MiB in all): on the IXI T1 training split the steps are 0.015-0.023 of
standardised intensity (spread about 1), the error at most half a step and its RMS 0.8 % of a brain's spread; the
augmentation's intensity changes during training are far larger.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Tuple

import numpy as np

from ..core.errors import BadInputError
from ..core.files import atomic_path

FORMAT = "brainanomaly-training-pack"
FORMAT_VERSION = 1


def write_pack(path, volumes: Iterable[Tuple[str, str, np.ndarray, np.ndarray]], meta: Callable[[], dict]) -> dict:
    """Write (subject, part, standardised image, brain mask) grid volumes and the dict `meta()` returns once they
    are read (it may name the scans they skipped) to `path`; returns the meta written (with "subjects", "parts" and
    "shape"). A volume whose outside-mask voxels are not one constant is refused: only the
    brain is stored."""
    subjects: List[str] = []
    parts: List[str] = []
    masks, values, low, step, outside = [], [], [], [], []
    shape = None
    for subject, part, image, mask in volumes:
        mask = np.asarray(mask, bool)
        if shape is None:
            shape = image.shape
        if image.shape != shape or mask.shape != shape:
            raise ValueError(f"{subject}: grid {image.shape} differs from the first volume's {shape}")
        rest = image[~mask]
        if rest.size and not np.all(rest == rest[0]):
            raise ValueError(f"{subject}: the image is not constant outside its brain mask; a pack keeps only "
                             "the brain")
        subjects.append(subject)
        parts.append(part)
        masks.append(np.packbits(mask.ravel()))
        brain = image[mask].astype(np.float64)
        lo, hi = (float(brain.min()), float(brain.max())) if brain.size else (0.0, 0.0)
        low.append(lo)
        step.append((hi - lo) / 255.0 if hi > lo else 1.0)
        values.append(np.round((brain - lo) / step[-1]).astype(np.uint8))
        outside.append(float(rest[0]) if rest.size else 0.0)
    if not subjects:
        raise ValueError("no volumes to pack")
    meta = dict(meta(), format=FORMAT, format_version=FORMAT_VERSION, subjects=subjects, parts=parts,
                shape=list(shape))
    with atomic_path(Path(path)) as tmp:
        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, meta=np.array(json.dumps(meta)), masks=np.stack(masks),
                                values=np.concatenate(values), low=np.asarray(low, np.float32),
                                step=np.asarray(step, np.float32), outside=np.asarray(outside, np.float32))
    return meta


class TrainingPack:
    """A pack read back: `meta`, and the (image float32, mask bool) grid volumes of its subjects."""

    def __init__(self, path) -> None:
        path = Path(path)
        if not path.is_file():
            raise BadInputError(f"training pack not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                self.meta = json.loads(str(data["meta"]))
                self._masks, self._values, self._outside = data["masks"], data["values"], data["outside"]
                self._low, self._step = data["low"], data["step"]
        except (OSError, ValueError, KeyError) as exc:
            raise BadInputError(f"{path} is not a readable training pack ({exc})") from None
        if self.meta.get("format") != FORMAT or int(self.meta.get("format_version", 0)) > FORMAT_VERSION:
            raise BadInputError(f"{path} is not a {FORMAT} v{FORMAT_VERSION} file")
        self.shape = tuple(self.meta["shape"])
        self.subjects: List[str] = list(self.meta["subjects"])
        n_voxels = int(np.prod(self.shape))
        self._mask_list = [np.unpackbits(row, count=n_voxels).astype(bool).reshape(self.shape)
                           for row in self._masks]
        self._starts = np.concatenate([[0], np.cumsum([int(m.sum()) for m in self._mask_list])])
        if self._starts[-1] != self._values.size:
            raise BadInputError(f"{path}: the stored voxels do not match the stored masks")

    def volume(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        mask = self._mask_list[i]
        image = np.full(self.shape, self._outside[i], np.float32)
        codes = self._values[self._starts[i]:self._starts[i + 1]].astype(np.float32)
        image[mask] = self._low[i] + self._step[i] * codes
        return image, mask

    def volumes(self, which: str = "all") -> Iterator[Tuple[np.ndarray, np.ndarray]]:
        """Volumes of the subjects of one part ("fit", "validation"), or of all of them ("all")."""
        for i, part in enumerate(self.meta["parts"]):
            if which in ("all", part):
                yield self.volume(i)

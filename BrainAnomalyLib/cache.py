"""On-disk cache of preprocessed grid volumes, so training, calibration and evaluation preprocess a scan once.

Lives outside the project (derived volumes are never committed); keyed by the file's content, the preprocessing
settings and the grid, so a change to any of them misses the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from .io import read_volume
from .errors import BadInputError
from .models import folder_digest, sha256_file
from .preprocess.chain import PreprocessConfig, preprocess
from .progress import Reporter
from .template import Grid

CACHE_VERSION = 1


def default_cache_dir() -> Path:
    env = os.environ.get("BRAINANOMALY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "brainanomaly" / "preprocessed"


def cache_key(path: Path, config: PreprocessConfig, grid: Grid) -> str:
    """Content hash of the scan (a file, or every file of a DICOM folder) plus the settings."""
    if path.is_dir():
        content = folder_digest(path)
    elif path.is_file():
        content = sha256_file(path)
    else:
        raise BadInputError(f"input not found: {path}")
    settings = json.dumps({"v": CACHE_VERSION, "pre": config.to_dict(), "grid": grid.to_dict()}, sort_keys=True)
    return hashlib.sha256((content + settings).encode()).hexdigest()[:32]


def preprocessed_arrays(path, config: PreprocessConfig, grid: Grid, cache_dir: Optional[Path] = None,
                        use_gpu: bool = False, reporter: Optional[Reporter] = None) -> Tuple[np.ndarray, np.ndarray]:
    """(normalised image, brain mask) on the grid for the scan at `path`, from the cache when possible."""
    path = Path(path)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / f"{cache_key(path, config, grid)}.npz"
    if target.is_file():
        with np.load(target) as data:
            return data["image"], data["mask"].astype(bool)
    pre = preprocess(read_volume(path), config, grid, use_gpu, reporter or Reporter())
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=cache_dir)
    os.close(fd)
    try:
        np.savez_compressed(tmp, image=pre.image.astype(np.float32), mask=pre.mask.astype(np.uint8))
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return pre.image, pre.mask

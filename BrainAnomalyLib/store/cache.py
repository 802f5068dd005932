"""On-disk cache of preprocessed grid volumes, so training, calibration and evaluation preprocess a scan once, and
the grid volumes of a list of manifest cases read through it.

Evaluation also needs the way back to the scan's own grid: the brain mask there, which is kept beside the grid volume
(`<key>.native.npz`) the first time a scan is evaluated, and the registration, which the preprocessing record holds.

Lives outside the project (derived volumes are never committed); keyed by the file's content, the preprocessing
settings and the grid, so a change to any of them misses the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..core.io import read_volume
from ..core.errors import BadInputError
from ..core.manifest import Case
from ..core.files import atomic_path, folder_digest, sha256_file
from ..preprocess.chain import (CHAIN_VERSION, PreprocessConfig, Preprocessed, companion_coverage, preprocess,
                                preprocess_companion, standardise, voxel_extent_on_grid)
from ..preprocess.register import affine_from_dict
from ..preprocess.sanity import rejudge
from ..core.progress import Reporter
from ..core.template import Grid

# 2: the cache holds the grid volume before standardisation, so any standardisation is applied on load.
CACHE_VERSION = 2


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
    settings = json.dumps({"v": CACHE_VERSION, "chain": CHAIN_VERSION, "pre": config.geometry_dict(),
                           "grid": grid.to_dict()}, sort_keys=True)
    return hashlib.sha256((content + settings).encode()).hexdigest()[:32]


def preprocessed_arrays(path, config: PreprocessConfig, grid: Grid, cache_dir: Optional[Path] = None,
                        use_gpu: bool = False, reporter: Optional[Reporter] = None,
                        standardised: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """(image, brain mask) on the grid for the scan at `path`, from the cache when possible; the image is
    standardised as `config` says, or left as it came out of registration with `standardised=False`."""
    raw, mask, _ = cached_preprocessing(path, config, grid, cache_dir, use_gpu, reporter)
    if not standardised:
        return raw, mask
    return standardise(raw, mask, config, grid)[0], mask


def cached_preprocessing(path, config: PreprocessConfig, grid: Grid, cache_dir: Optional[Path] = None,
                         use_gpu: bool = False, reporter: Optional[Reporter] = None
                         ) -> Tuple[np.ndarray, np.ndarray, Optional[List[dict]]]:
    """(grid volume before standardisation, brain mask, preprocessing record) for the scan at `path`; the record
    is None for entries cached before records were kept."""
    path = Path(path)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / f"{cache_key(path, config, grid)}.npz"
    if target.is_file():
        with np.load(target) as data:
            record = json.loads(str(data["record"])) if "record" in data.files else None
            image, mask = data["image"], data["mask"].astype(bool)
        if record:
            # The limits may have changed since the entry was written: a cached scan is refused or noted as a fresh one.
            rejudge(record)
        return image, mask, record
    # Only the volume before standardisation is kept, so run the chain with a method that needs no reference.
    plain = replace(config, normalisation="median-iqr", normalisation_reference=None)
    pre = preprocess(read_volume(path), plain, grid, use_gpu, reporter or Reporter())
    _write_grid_entry(target, pre)
    return pre.raw_image, pre.mask, pre.record


def _write_grid_entry(target: Path, pre: Preprocessed) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        np.savez_compressed(tmp, image=pre.raw_image.astype(np.float32), mask=pre.mask.astype(np.uint8),
                            record=np.array(json.dumps(pre.record)))


def cached_preprocessed(path, native, config: PreprocessConfig, grid: Grid, cache_dir: Optional[Path] = None,
                        use_gpu: bool = False, reporter: Optional[Reporter] = None) -> Preprocessed:
    """What `preprocess` returns for the scan at `path` (already read as `native`), from the cache when the scan has
    been through it with its native brain mask; otherwise preprocessed here and cached for the next run."""
    path = Path(path)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key = cache_key(path, config, grid)
    grid_file, native_file = cache_dir / f"{key}.npz", cache_dir / f"{key}.native.npz"
    if grid_file.is_file() and native_file.is_file():
        raw, mask, record = cached_preprocessing(path, config, grid, cache_dir)
        with np.load(native_file) as data:
            native_mask = data["mask"].astype(bool)
        steps = {s["step"]: s for s in record or []}
        # Entries cached before the contrast and sanity steps existed lack what a detection needs: redo those.
        if {"register", "contrast", "sanity"} <= set(steps) and native_mask.shape == tuple(reversed(native.GetSize())):
            image = standardise(raw, mask, config, grid)[0]
            contrast = {k: v for k, v in steps["contrast"].items() if k not in ("step", "applied", "seconds")}
            transform = affine_from_dict(steps["register"]["transform"])
            # The voxel extent follows from the scan's header and the registration, so a cached scan scores as a
            # fresh one does (thick slices widen the tissue scorer's priors).
            return Preprocessed(image, mask, native_mask, transform, grid, record, raw_image=raw, contrast=contrast,
                                notes=list(steps["sanity"].get("notes", [])),
                                acquisition_mm=voxel_extent_on_grid(native, transform, grid))
    plain = replace(config, normalisation="median-iqr", normalisation_reference=None)
    pre = preprocess(native, plain, grid, use_gpu, reporter or Reporter())
    _write_grid_entry(grid_file, pre)
    with atomic_path(native_file) as tmp:
        np.savez_compressed(tmp, mask=pre.native_mask.astype(np.uint8))
    pre.image = standardise(pre.raw_image, pre.mask, config, grid)[0]
    return pre


def cached_companion(path, native, reference: Preprocessed, reference_native, reference_path,
                     reference_config: PreprocessConfig, config: PreprocessConfig, reporter: Optional[Reporter] = None,
                     cache_dir: Optional[Path] = None) -> Preprocessed:
    """What `preprocess_companion` returns for the scan at `path` (already read as `native`) beside the reference
    scan at `reference_path` (read as `reference_native`, preprocessed with `reference_config` as `reference`),
    from the cache when this pair has
    been through it: the companion's N4 fit is most of a fusion model's time on a cached reference.

    Keyed by both scans' content and settings, as the reference's own entry is, so it holds exactly what
    preprocess_companion gives (its grid volume before standardisation, its brain mask, contrast and record)."""
    path = Path(path)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    grid = reference.grid
    pair = cache_key(Path(reference_path), reference_config, grid) + cache_key(path, config, grid)
    target = cache_dir / f"{hashlib.sha256(('companion' + pair).encode()).hexdigest()[:32]}.companion.npz"
    if target.is_file():
        # Checked again, as a fresh pair would be (the entry may predate the check).
        companion_coverage(native, reference, reference_native)
        with np.load(target) as data:
            raw, native_mask = data["image"], data["mask"].astype(bool)
            record, contrast = json.loads(str(data["record"])), json.loads(str(data["contrast"]))
        return Preprocessed(standardise(raw, reference.mask, config, grid)[0], reference.mask, native_mask,
                            reference.transform, grid, record, raw_image=raw, contrast=contrast,
                            acquisition_mm=voxel_extent_on_grid(native, reference.transform, grid))
    pre = preprocess_companion(native, reference, reference_native, config, reporter or Reporter())
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target) as tmp:
        np.savez_compressed(tmp, image=pre.raw_image, mask=pre.native_mask.astype(np.uint8),
                            record=np.array(json.dumps(pre.record)), contrast=np.array(json.dumps(pre.contrast)))
    return pre


def cases_on_grid(cases: Sequence[Case], config: PreprocessConfig, grid: Grid, reporter: Reporter,
                  cache_dir: Optional[Path] = None, step: str = "preprocess", skipped: Optional[List[str]] = None,
                  standardised: bool = True) -> Iterator[Tuple[Case, np.ndarray, np.ndarray]]:
    """(case, image, mask) on the grid for each case, from the preprocessing cache. A scan that is bad input or an
    unreadable file is named in `skipped` and passed over (raised when `skipped` is None)."""
    for i, case in enumerate(cases):
        reporter(f"{step} {case.subject}", i / max(len(cases), 1))
        try:
            image, mask = preprocessed_arrays(case.image, config, grid, cache_dir, standardised=standardised)
        except (BadInputError, OSError) as exc:  # OSError: a file named in the manifest cannot be read
            if skipped is None:
                raise
            skipped.append(f"{case.key}: {exc}")
            continue
        yield case, image, mask
    reporter(step, 1.0)


def grid_volumes(cases: Sequence[Case], config: PreprocessConfig, grid: Grid, reporter: Reporter,
                 cache_dir: Optional[Path] = None, step: str = "preprocess",
                 skipped: Optional[List[str]] = None) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Standardised (image, mask) grid volumes of `cases`, as scorers' `fit` takes them."""
    for _, image, mask in cases_on_grid(cases, config, grid, reporter, cache_dir, step, skipped):
        yield image, mask

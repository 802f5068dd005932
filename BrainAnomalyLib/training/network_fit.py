"""Fitting a learned scorer's network on healthy grid volumes and its voxel-wise healthy statistics: the part of
training that wants a GPU. Shared by `brainanomaly train` (volumes from the preprocessing cache) and the training
pack path (training/packed.py); free of the preprocessing (SimpleITK)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Tuple

import numpy as np

from ..core.progress import Reporter


def rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 writes the model."""
    return int(os.environ.get("RANK", "0"))


def fit_network(kind: str, params: dict, fit: Iterable, validation: Iterable,
                all_training: Callable[[], Iterable], n_train: int, options: dict,
                reporter: Reporter) -> Optional[Tuple[dict, Dict[str, np.ndarray]]]:
    """(params, tensors) of a `kind` scorer trained on the `fit` (image, mask) volumes, stopped early on
    `validation`, then (residual_norm "voxel", the default) given the voxel-wise spread of its maps over
    `all_training()` (all n_train training volumes: the more scans, the steadier each voxel's spread). None on a
    torchrun rank other than 0."""
    from ..core.device import resolve_device
    from ..scorers import scorer_class
    from ..scorers.learned import fit_residual_norm

    params, tensors = scorer_class(kind).fit(fit, params, reporter.sub(0.0, 0.94), validation=validation,
                                             options=options)
    if rank() != 0:
        return None
    if options.get("residual_norm", "voxel") == "voxel":
        params, tensors = fit_residual_norm(kind, params, tensors, all_training(), reporter.sub(0.94, 1.0),
                                            resolve_device(options.get("device") or "auto"), n_train)
    return dict(params, scan_norm=options.get("scan_norm", "robust")), tensors


def attach_reports(folder: Path, report_dir: Path) -> None:
    """Copy the training report (loss curves, reconstructions, realism) into the model folder's training/."""
    if report_dir.is_dir() and any(report_dir.iterdir()):
        from ..core.files import staged_folder

        with staged_folder(Path(folder) / "training") as stage:
            shutil.copytree(report_dir, stage, dirs_exist_ok=True)

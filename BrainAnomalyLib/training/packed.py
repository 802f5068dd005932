"""Training from a training pack (store/training_pack.py): the networks of learned scorers trained where neither the
scans nor the preprocessing are (a lent GPU host; scripts/gpu_train.sh), calibrated afterwards where they are.

`pack_training_split` (on the machine with the scans) packs the training split exactly as `brainanomaly train`
would read it; `train_from_pack` (anywhere with torch and MONAI) trains a learned scorer from it and writes an
uncalibrated model folder, which `brainanomaly calibrate --split calibration` calibrates on the same manifest's
held-out scans. This module imports no SimpleITK: the preprocessing is imported only by the packing.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional

from ..core.errors import BadInputError
from ..core.progress import Reporter
from ..store.training_pack import TrainingPack, write_pack
from .meta import model_meta, settings_meta, training_data
from .network_fit import attach_reports, fit_network


def pack_training_split(manifest: Path, modality: str, path: Path, reporter: Reporter,
                        max_train: Optional[int] = None, cache_dir: Optional[Path] = None) -> dict:
    """Write the standardised grid volumes of a manifest's training split (cut to `max_train`, its fit subjects
    first, then its validation ones) to a training pack at `path`; returns the pack's meta. Default preprocessing
    and post-processing, as `brainanomaly train` without preprocessing options."""
    from ..core.template import Grid
    from ..detection.postprocess import PostprocessConfig
    from ..preprocess.chain import PreprocessConfig
    from ..store.cache import cases_on_grid
    from .run import training_cases, validation_split

    split = training_cases(manifest, modality, max_train)
    grid, pre, post = Grid(), PreprocessConfig(), PostprocessConfig()
    fit_cases, val_cases = validation_split(split.train)
    skipped: list = []

    def volumes():
        for part, cases in (("fit", fit_cases), ("validation", val_cases)):
            for case, image, mask in cases_on_grid(cases, pre, grid, reporter, cache_dir, f"pack {part}", skipped):
                yield case.subject, part, image, mask

    def meta():  # after the volumes: the record names the scans they skipped
        return {"modality": modality, "settings": settings_meta(grid, pre, post),
                "training_data": training_data(manifest, split.train, split.splits, len(split.lesion_rows), skipped,
                                               len(split.other_rows))}

    return write_pack(path, volumes(), meta)


def train_from_pack(kind: str, pack_path: Path, out: Path, reporter: Reporter, name: Optional[str] = None,
                    direction: str = "auto", options: Optional[dict] = None, half: bool = False) -> Optional[Path]:
    """Train a learned `kind` scorer on a training pack's volumes (its fit subjects, stopped early on its validation
    ones, voxel statistics over all of them) and write the model folder uncalibrated. None on a torchrun rank other
    than 0. `half` stores the weights as float16."""
    from ..scorers import direction_for, scorer_class
    from ..scorers.learned import LearnedScorer
    from ..store.models import save_model

    if not issubclass(scorer_class(kind), LearnedScorer):
        raise BadInputError(f"a training pack trains learned scorers only, not {kind!r}")
    pack = TrainingPack(pack_path)
    modality = pack.meta["modality"]
    params = {"direction": direction_for(modality) if direction == "auto" else direction}
    options = dict(options or {})
    options.setdefault("checkpoint_dir", str(Path(out).with_name(Path(out).name + ".checkpoints")))
    report_dir = Path(tempfile.mkdtemp(prefix="brainanomaly-report-"))
    options["report_dir"] = str(report_dir)
    t = time.perf_counter()
    try:
        fitted = fit_network(kind, params, pack.volumes("fit"), pack.volumes("validation"),
                             lambda: pack.volumes("all"), len(pack.subjects), options, reporter)
        if fitted is None:
            return None
        params, tensors = fitted
        record = pack.meta["training_data"]
        meta = model_meta(kind, name or Path(out).name, modality,
                          f"{kind} scorer for {modality}, trained on {record['manifest']}", pack.meta["settings"],
                          params)
        meta["training_data"] = dict(record, seconds=round(time.perf_counter() - t, 1),
                                     training_pack=Path(pack_path).name)
        folder = save_model(out, meta, tensors, half=half)
        attach_reports(folder, report_dir)
        return folder
    finally:
        shutil.rmtree(report_dir, ignore_errors=True)

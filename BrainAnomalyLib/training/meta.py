"""What a trained model's model.json says about how it was made: the settings and the training record. Free of the
preprocessing (SimpleITK) so that the networks can be trained from a training pack on a host without it."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

from .. import __version__
from ..core.manifest import Case
from ..core.template import TEMPLATE_NAME


def settings_meta(grid, pre, post) -> dict:
    """The grid, preprocessing and post-processing a model works under (objects with to_dict())."""
    return {"template": TEMPLATE_NAME, "grid": grid.to_dict(), "preprocessing": pre.to_dict(),
            "postprocess": post.to_dict()}


def model_meta(kind: str, name: str, modality: str, description: str, settings: dict, params: dict) -> dict:
    return {"name": name, "kind": kind, "version": "1.0.0", "modality": modality, "description": description,
            **settings, "params": params, "created_with": f"BrainAnomalyLib {__version__}"}


def base_meta(kind: str, name: str, modality: str, description: str, grid, pre, post, params: dict) -> dict:
    return model_meta(kind, name, modality, description, settings_meta(grid, pre, post), params)


def training_data(manifest, train_cases: Sequence[Case], splits: Dict[str, List[Case]], n_lesion_rows: int,
                  skipped: Sequence[str], n_other_rows: int) -> dict:
    """model.json's training_data (without "seconds"): which scans of which manifest trained and calibrated it."""
    return {"manifest": Path(manifest).name, "n_train": len(train_cases),
            "n_calibration": len(splits["calibration"]), "n_test_held_out": len(splits["test"]),
            "lesion_rows_ignored": n_lesion_rows, "skipped": list(skipped), "other_modality_rows": n_other_rows,
            "test_subjects": sorted({c.subject for c in splits["test"]})}

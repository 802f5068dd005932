"""Writing a Result to a folder: all files appear together or not at all."""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from pathlib import Path

import SimpleITK as sitk

from ..core.io import write_volume
from .overlay import overlay_montage
from .postprocess import LESION_COLUMNS
from ..core.result import Result

OUTPUT_FILES = ("anomaly_map.nii.gz", "pred_mask.nii.gz", "brain_mask.nii.gz", "lesions.csv", "result.json",
                "overlay.png")


def write_lesions_csv(lesions, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["label", "voxels", "volume_ml", "centroid_r", "centroid_a", "centroid_s", "centroid_i",
                    "centroid_j", "centroid_k", "mean_score", "max_score"])
        for les in lesions:
            w.writerow([les["label"], les["voxels"], les["volume_ml"], *les["centroid_ras"], *les["centroid_ijk"],
                        les["mean_score"], les["max_score"]])


def write_result(result: Result, scan: sitk.Image, outdir, input_name: str = "") -> Path:
    """Write every output into `outdir`; staged in a hidden sibling folder and moved in at the end."""
    outdir = Path(outdir)
    created = not outdir.exists()
    outdir.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".partial-", dir=outdir))
    done = False
    try:
        write_volume(result.anomaly_map, stage / "anomaly_map.nii.gz")
        write_volume(result.pred_mask, stage / "pred_mask.nii.gz")
        write_volume(result.brain_mask, stage / "brain_mask.nii.gz")
        if result.reconstruction is not None:
            write_volume(result.reconstruction, stage / "reconstruction.nii.gz")
        write_lesions_csv(result.lesions, stage / "lesions.csv")
        summary = dict(result.summary(), input=input_name, lesion_columns=list(LESION_COLUMNS))
        (stage / "result.json").write_text(json.dumps(summary, indent=2) + "\n")
        fpr = result.threshold.get("fpr")
        title = (f"{input_name}  model {result.model['name']}  threshold {result.threshold['value']:.3g}"
                 + (f" (healthy FPR {fpr:.2%})" if fpr else "") + f"  lesions {len(result.lesions)}")
        overlay_montage(scan, result.anomaly_map, result.pred_mask, result.threshold["value"],
                        stage / "overlay.png", result.brain_mask, title=title)
        for f in stage.iterdir():
            os.replace(f, outdir / f.name)
        done = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not done and created and not any(outdir.iterdir()):
            outdir.rmdir()
    return outdir

"""The one output layout of a detection, for every front end (CLI, worker, Slicer batch): NIfTI or NRRD is only
the volumes' format. All files appear together or not at all."""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import List, Optional

import SimpleITK as sitk

from ..core.errors import BadInputError
from ..core.io import write_volume
from ..core.progress import Reporter
from ..core.result import Result
from .overlay import overlay_montage
from .postprocess import LESION_COLUMN_NAMES, lesion_row
from .request import FORMATS

VOLUMES = ("anomaly_map", "pred_mask", "brain_mask", "reconstruction")  # reconstruction: when the scorer has one
TABLES = ("lesions.csv", "result.json", "overlay.png")


def output_names(fmt: str = "nifti", reconstruction: bool = True) -> List[str]:
    """The files `write_result` writes."""
    return [v + FORMATS[fmt] for v in VOLUMES if reconstruction or v != "reconstruction"] + list(TABLES)


def write_lesions_csv(lesions, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(LESION_COLUMN_NAMES)
        for les in lesions:
            w.writerow(lesion_row(les))


def write_result(result: Result, scan: sitk.Image, outdir, fmt: str = "nifti", input_name: str = "",
                 reporter: Optional[Reporter] = None) -> Path:
    """Write every output into `outdir`; staged in a hidden folder inside it and moved in at the end (a cancel
    seen before then leaves nothing)."""
    reporter = reporter or Reporter()
    if fmt not in FORMATS:
        raise BadInputError(f"unknown output format {fmt!r}; choose from {', '.join(FORMATS)}")
    outdir = Path(outdir)
    created = not outdir.exists()
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=".partial-", dir=outdir))
    except OSError as exc:
        raise BadInputError(f"cannot write to {outdir}: {exc.strerror or exc}") from None
    done = False
    try:
        reporter("write outputs", 0.0)
        for name in VOLUMES:
            image = getattr(result, name)
            if image is not None:
                write_volume(image, stage / (name + FORMATS[fmt]))
        write_lesions_csv(result.lesions, stage / "lesions.csv")
        summary = dict(result.summary(), input=input_name, lesion_columns=list(LESION_COLUMN_NAMES))
        (stage / "result.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        fpr = result.threshold.get("fpr")
        title = (f"{input_name}  model {result.model['name']}  threshold {result.threshold['value']:.3g}"
                 + (f" (healthy FPR {fpr:.2%})" if fpr else "") + f"  lesions {len(result.lesions)}")
        overlay_montage(scan, result.anomaly_map, result.pred_mask, result.threshold["value"],
                        stage / "overlay.png", result.brain_mask, title=title)
        reporter.check()
        for f in stage.iterdir():
            os.replace(f, outdir / f.name)
        done = True
        reporter("write outputs", 1.0)
    except OSError as exc:
        raise BadInputError(f"cannot write the outputs to {outdir}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not done and created and outdir.is_dir() and not any(outdir.iterdir()):
            outdir.rmdir()
    return outdir


def read_result(folder) -> Result:
    """A Result back from a folder `write_result` wrote (in either format)."""
    folder = Path(folder)
    try:
        summary = json.loads((folder / "result.json").read_text(encoding="utf-8"))
        ext = next(e for e in FORMATS.values() if (folder / ("anomaly_map" + e)).is_file())
        images = {name: sitk.ReadImage(str(folder / (name + ext))) for name in VOLUMES
                  if (folder / (name + ext)).is_file()}
    except (OSError, ValueError, RuntimeError, StopIteration) as exc:
        raise BadInputError(f"{folder} does not hold readable detection outputs ({exc})") from None
    keys = {f.name for f in fields(Result)}
    given = {k: v for k, v in summary.items() if k in keys}
    return Result(**images, **given, scan_curve=summary.get("scan_calibration"))

"""The one output layout of a detection, for every front end (CLI, worker, Slicer batch): NIfTI or NRRD is only
the volumes' format. All files appear together or not at all.

The output folder rule, checked before any computing (`check_output`): a new or empty folder is written; a folder
holding an earlier result (only files this writer, or a manifest run of it, writes) is refused unless `overwrite`,
which replaces the whole folder at once through core/files.staged_folder, so no file of the earlier result stays;
a folder holding anything else is refused even with `overwrite`, because replacing it whole would delete files this
program did not write."""

from __future__ import annotations

import csv
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Tuple

import SimpleITK as sitk

from ..core.background import Background
from ..core.errors import BadInputError
from ..core.files import staged_folder
from ..core.io import itk_reason, write_volume
from ..core.progress import Reporter
from ..core.result import Result
from .overlay import overlay_montage
from .postprocess import LESION_COLUMN_NAMES, lesion_row, number_findings
from .request import FORMATS

VOLUMES = ("anomaly_map", "pred_mask", "brain_mask", "reconstruction")  # reconstruction: when the scorer has one
TABLES = ("lesions.csv", "result.json", "overlay.png")
SUMMARY = "summary.csv"  # a manifest run's overview, beside its case folders
_STAGE = ".partial-"  # write_result's private staging folder inside an empty output folder


def output_names(fmt: str = "nifti", reconstruction: bool = True) -> List[str]:
    """The files `write_result` writes."""
    return [v + FORMATS[fmt] for v in VOLUMES if reconstruction or v != "reconstruction"] + list(TABLES)


def write_lesions_csv(lesions, path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(LESION_COLUMN_NAMES)
        for les in lesions:
            w.writerow(lesion_row(les))


def _names() -> frozenset:
    return frozenset(n for fmt in FORMATS for n in output_names(fmt))


def folder_contents(folder, extra: Iterable[str] = (), cases: bool = False) -> Tuple[List[str], List[str]]:
    """(entries of an earlier result, other entries) of `folder`, by name; both empty for a missing or empty
    folder. An earlier result is the writer's files in either format and `extra` (e.g. the demo's own scan); with
    `cases`, a manifest run's: its summary and case folders that hold nothing but such files."""
    folder = Path(folder)
    if not folder.is_dir():
        return [], []
    known, earlier, other = _names() | set(extra), [], []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if entry.name.startswith(_STAGE) or (entry.name.startswith(".") and "-swap-" in entry.name) \
                or (entry.is_file() and entry.name in known):
            earlier.append(entry.name)  # staging folders left by a killed run (ours or staged_folder's) are ours
        elif cases and entry.name == SUMMARY and entry.is_file():
            earlier.append(entry.name)
        elif cases and entry.is_dir() and not entry.is_symlink() and not folder_contents(entry, extra)[1]:
            earlier.append(entry.name + "/")
        else:
            other.append(entry.name + ("/" if entry.is_dir() else ""))
    return earlier, other


def _listing(names: List[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def check_output(folder, overwrite: bool = False, extra: Iterable[str] = (), cases: bool = False) -> bool:
    """Refuse, before any computing, an output folder that cannot be written or holds what must not be replaced
    (see the module's docstring); True when an earlier result is there to be replaced. `cases`: the folder of a
    manifest run (case folders and a summary)."""
    folder = Path(folder).absolute()
    if folder.exists() and not folder.is_dir():
        raise BadInputError(f"the output {folder} is a file, not a folder")
    earlier, other = folder_contents(folder, extra, cases)
    if other:
        what = "an earlier result and other files" if earlier else "files that are not a BrainAnomaly result"
        raise BadInputError(f"the output folder {folder} holds {what} ({_listing(other)}); choose a new or empty "
                            "folder (--overwrite replaces only a folder that holds nothing but an earlier result)")
    if earlier and not overwrite:
        raise BadInputError(f"the output folder {folder} holds an earlier result ({_listing(earlier)}); pass "
                            "--overwrite to replace it, or choose a new or empty folder")
    if earlier and (folder == Path.cwd() or folder in Path.cwd().parents):
        raise BadInputError(f"the output folder {folder} holds an earlier result and is (or holds) the current "
                            "folder, which cannot be replaced whole; run from another folder")
    # Replacing swaps the whole folder, which needs its parent; a new folder needs its nearest existing ancestor.
    place = folder if folder.is_dir() and not earlier else folder.parent
    while not place.exists():
        place = place.parent
    if not place.is_dir():
        raise BadInputError(f"cannot write to {folder}: {place} is a file, not a folder")
    for where in {place, folder} if earlier else {place}:
        if not os.access(where, os.W_OK | os.X_OK):
            raise BadInputError(f"cannot write to {folder}: no permission to write in {where}")
    return bool(earlier)


@contextmanager
def output_root(folder, overwrite: bool = False, extra: Iterable[str] = (), cases: bool = False) -> Iterator[Path]:
    """The folder to write a result set into, after `check_output`: a staging folder that replaces `folder` whole
    when the block ends normally (on an error or a cancel an earlier result stays as it was, a new folder does not
    appear), or `folder` itself when it is empty, or new for a manifest run (whose cases then appear as they
    finish)."""
    folder = Path(folder).absolute()  # "." has no name to swap by
    if check_output(folder, overwrite, extra, cases) or not (folder.exists() or cases):
        with staged_folder(folder) as stage:
            yield stage
    else:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BadInputError(f"cannot write to {folder}: {exc.strerror or exc}") from None
        yield folder


def write_outputs(result: Result, scan: sitk.Image, folder: Path, fmt: str = "nifti", input_name: str = "",
                  reporter: Optional[Reporter] = None) -> None:
    """Write every output file into `folder` (a private staging folder: see `write_result`)."""
    reporter = reporter or Reporter()
    reporter("write outputs", 0.0)
    t = result.threshold
    if t.get("false_findings") is not None:
        # heat above the base threshold in colour; the reported findings outlined in cyan
        point = f"{t['false_findings']:g} false findings / healthy scan (heat from the {t['fpr']:.0%} voxel FPR)"
    else:
        point = f"threshold {t['value']:.3g}" + (f" (healthy FPR {t['fpr']:.2%})" if t.get("fpr") else "")
    title = f"{input_name}  model {result.model['name']}  {point}  findings {len(result.lesions)}"
    # The montage (Python-bound drawing) is drawn beside the volumes' compression, which releases the GIL.
    overlay = Background(lambda: overlay_montage(scan, result.anomaly_map, result.pred_mask, t["value"],
                                                 folder / "overlay.png", result.brain_mask, title=title),
                         name="overlay")
    volumes = {name: getattr(result, name) for name in VOLUMES if getattr(result, name) is not None}
    beside = None
    try:
        if "reconstruction" in volumes:
            # One of the two full-size float volumes is compressed on a thread of its own (zlib releases the GIL):
            # the two took 0.31 s one after the other and 0.18 s side by side.
            reconstruction = volumes.pop("reconstruction")
            beside = Background(lambda: write_volume(reconstruction, folder / ("reconstruction" + FORMATS[fmt])),
                                name="write reconstruction")
        for name, image in volumes.items():
            write_volume(image, folder / (name + FORMATS[fmt]))
        write_lesions_csv(result.lesions, folder / "lesions.csv")
        summary = dict(result.summary(), input=input_name, lesion_columns=list(LESION_COLUMN_NAMES))
        (folder / "result.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    finally:
        # never leaves the folder (perhaps to be deleted) while a thread still writes into it
        for work in (beside, overlay):
            if work is not None:
                work.wait()
    for work in (beside, overlay):
        if work is not None:
            work.result()
    reporter.check()


@contextmanager
def staged_output(outdir, overwrite: bool = False, extra: Iterable[str] = ()) -> Iterator[Path]:
    """A private folder to write a set of outputs into, whose files appear in `outdir` under the output folder rule
    (`check_output`; `extra` as there) when the block ends normally, and none of them on an error or a cancel. A
    new folder, or one that replaces an earlier result, is built beside it and swapped in; an empty folder
    (perhaps the user's own) is filled from a staging folder inside it."""
    outdir = Path(outdir).absolute()
    try:
        with output_root(outdir, overwrite, extra) as root:
            if root != outdir:
                yield root
            else:
                stage = Path(tempfile.mkdtemp(prefix=_STAGE, dir=outdir))
                try:
                    yield stage
                    for f in stage.iterdir():
                        os.replace(f, outdir / f.name)
                finally:
                    shutil.rmtree(stage, ignore_errors=True)
    except OSError as exc:
        raise BadInputError(f"cannot write the outputs to {outdir}: {exc.strerror or exc}") from None


def write_result(result: Result, scan: sitk.Image, outdir, fmt: str = "nifti", input_name: str = "",
                 reporter: Optional[Reporter] = None, overwrite: bool = False) -> Path:
    """Write every output into `outdir` through `staged_output`: a cancel or an error before the end leaves
    nothing new."""
    reporter = reporter or Reporter()
    if fmt not in FORMATS:
        raise BadInputError(f"unknown output format {fmt!r}; choose from {', '.join(FORMATS)}")
    outdir = Path(outdir).absolute()
    with staged_output(outdir, overwrite) as stage:
        write_outputs(result, scan, stage, fmt, input_name, reporter)
    reporter("write outputs", 1.0)
    return outdir


@contextmanager
def dicom_output(result: Result, source, outdir, per_finding: bool = True, overwrite: bool = False
                 ) -> Iterator[List[Path]]:
    """The findings as a DICOM SEG and the anomaly map as a Parametric Map, referencing the DICOM series in the
    folder `source` the detection ran on (core/dicom.export_dicom), written into `outdir` under the output folder
    rule. They are made before the block and appear when it ends normally, so other outputs written inside it
    appear with them or not at all. Yields their final paths."""
    from ..core.dicom import DICOM_OUTPUTS, export_dicom

    outdir = Path(outdir).absolute()
    try:
        findings = number_findings(result.pred_mask, result.lesions)
    except ValueError as exc:
        raise BadInputError(f"cannot export to DICOM: {exc}") from None
    with staged_output(outdir, overwrite, extra=DICOM_OUTPUTS) as stage:
        export_dicom(findings, result.lesions, result.anomaly_map, source, stage, per_finding,
                     result.model.get("name", ""), result.display_range)
        yield [outdir / name for name in DICOM_OUTPUTS]


def write_dicom(result: Result, source, outdir, per_finding: bool = True, overwrite: bool = False) -> List[Path]:
    """`dicom_output` alone: the SEG and parametric map of a result (e.g. one `read_result` read back)."""
    with dicom_output(result, source, outdir, per_finding, overwrite) as paths:
        pass
    return paths


def read_result(folder) -> Result:
    """A Result back from a folder `write_result` wrote (in either format)."""
    folder = Path(folder)
    try:
        summary = json.loads((folder / "result.json").read_text(encoding="utf-8"))
        ext = next(e for e in FORMATS.values() if (folder / ("anomaly_map" + e)).is_file())
        images = {name: sitk.ReadImage(str(folder / (name + ext))) for name in VOLUMES
                  if (folder / (name + ext)).is_file()}
    except StopIteration:
        raise BadInputError(f"{folder} does not hold detection outputs (no anomaly_map volume)") from None
    except RuntimeError as exc:
        raise BadInputError(f"{folder} does not hold readable detection outputs ({itk_reason(exc)})") from None
    except (OSError, ValueError) as exc:
        raise BadInputError(f"{folder} does not hold readable detection outputs "
                            f"({getattr(exc, 'strerror', None) or exc})") from None
    keys = {f.name for f in fields(Result)}
    given = {k: v for k, v in summary.items() if k in keys}
    return Result(**images, **given, scan_curve=summary.get("scan_calibration"))

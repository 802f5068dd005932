"""`detect --manifest`: the cases of a manifest and the one per-scan function that the sequential run, the process
pool and Dask all call (cohort_engines.py runs it).

A case is one row of the model's modality, or for a fusion model one subject's rows of the model's contrasts; its
outputs go to OUT/<key>/ through detection/writers.write_result, which builds the folder aside and renames it into
place, so a case folder that exists is complete and a rerun with `--resume` keeps it."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..core.errors import BadInputError, BrainAnomalyError, ModelError
from ..core.manifest import normalise_modality
from ..core.progress import Reporter
from ..detection.request import DetectionRequest

SUMMARY_COLUMNS = ("subject", "modality", "status", "n_lesions", "anomalous_volume_ml", "pred_score", "message")
# Failures that the same scan and model give again: retrying them only costs time.
REPEATABLE = (BadInputError, ModelError)


@dataclass
class DicomOut:
    """Where `--dicom-out` writes a case's SEG and parametric map, and how."""

    folder: Path
    per_finding: bool = True
    # --overwrite, kept apart from the case requests': a manifest's -o is replaced whole, its DIR case by case.
    overwrite: bool = False


@dataclass
class CaseJob:
    """One case of a manifest run: what the per-scan function needs, picklable for worker processes."""

    key: str  # the case folder's name: <subject>_<modality>, or <subject> for a fusion model
    subject: str
    label: str  # the summary's modality column
    request: DetectionRequest  # output: the case folder
    resume: bool = False  # keep a complete earlier result of the same model
    dicom: Optional[DicomOut] = None  # --dicom-out: this case's folder


def manifest_jobs(det, request: DetectionRequest, manifest, root: Path, resume: bool = False,
                  dicom: Optional[DicomOut] = None) -> Tuple[List[CaseJob], List[list], str]:
    """(cases, summary rows of the manifest rows left out, one line saying what is run): every row of the model's
    modality, or for a fusion model each subject's rows of the model's contrasts. Rows left out are printed."""
    from ..core.manifest import group_by_subject, read_manifest, skipped_rows

    skipped: list = []
    common = dict(modality=None, overwrite=False, input=None, inputs=None)
    if det.model.kind == "fusion":
        subjects = group_by_subject(read_manifest(manifest), det.modalities, skipped)
        why = f"model {det.model.name} fuses {', '.join(det.modalities)}"
        total = sum(len(v) for v in subjects.values()) + len(skipped)
        jobs = [CaseJob(subject, subject, "+".join(c.modality for c in cases),
                        dataclasses.replace(request, **dict(common, inputs={c.modality: str(c.image) for c in cases},
                                                            output=str(root / subject))), resume,
                        _case_dicom(dicom, subject))
                for subject, cases in subjects.items()]
        what = f"subjects ({det.label(det.modalities)})"
    else:
        modality = request.modality or det.model.modality
        cases = read_manifest(manifest, modality, skipped)
        keys = [c.key for c in cases]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise BadInputError(f"{manifest}: more than one row for {', '.join(twice)} (subject and modality name "
                                "a case's output folder)")
        why = (f"--modality {request.modality} was asked for" if request.modality
               else f"this model is for {det.model.modality}")
        total = len(cases) + len(skipped)
        jobs = [CaseJob(c.key, c.subject, c.modality,
                        dataclasses.replace(request, **dict(common, input=str(c.image), modality=c.modality,
                                                            output=str(root / c.key))), resume,
                        _case_dicom(dicom, c.key))
                for c in cases]
        what = f"{modality} scans"
    if skipped:
        print(skipped_rows(skipped, total, why))
    rows = [[c.subject, c.modality, "skipped", "", "", "", f"modality {c.modality}, {why}"] for c in skipped]
    return jobs, rows, what


def _case_dicom(dicom: Optional[DicomOut], key: str) -> Optional[DicomOut]:
    return dataclasses.replace(dicom, folder=dicom.folder / key) if dicom is not None else None


# One detector per process and model settings: a worker loads (and checksums) its model once, not once per scan.
_DETECTORS: Dict[str, object] = {}


def _settings_key(request: DetectionRequest) -> str:
    d = request.to_dict()
    for k in ("input", "inputs", "output", "modality", "overwrite"):
        d.pop(k, None)
    return json.dumps(d, sort_keys=True, default=str)


def remember_detector(request: DetectionRequest, det) -> None:
    """Let this process's per-scan calls reuse a detector already loaded for `request`'s settings."""
    _DETECTORS[_settings_key(request)] = det


def detector_for(request: DetectionRequest):
    from ..detection.pipeline import Detector

    key = _settings_key(request)
    if key not in _DETECTORS:
        _DETECTORS[key] = Detector.from_request(request)
    return _DETECTORS[key]


def complete_result(folder: Path, model_name: str, fmt: str) -> Optional[dict]:
    """The summary of an earlier, complete result of `model_name` in `folder`, else None."""
    from ..detection.writers import output_names

    try:
        summary = json.loads((folder / "result.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (summary.get("model") or {}).get("name") != model_name:
        return None
    if not all((folder / n).is_file() for n in output_names(fmt, reconstruction=False)):
        return None
    return summary


def detect_one(det, request: DetectionRequest, reporter: Reporter, dicom: Optional[DicomOut] = None) -> dict:
    """Detect on the request's input and write the outputs into its output folder (and with `dicom`, the DICOM
    ones into theirs: all of them or none); the summary written."""
    from ..detection.writers import dicom_output, write_result

    source = dicom_source(request) if dicom is not None else None  # refused before anything is computed
    result, scan = det.run_request(request, reporter.sub(0.0, 0.95))
    with dicom_output(result, source, dicom.folder, dicom.per_finding, dicom.overwrite) if dicom is not None \
            else contextlib.nullcontext():
        write_result(result, scan, request.output, request.output_format, request.input_name(),
                     reporter.sub(0.95, 1.0), overwrite=request.overwrite)
    return result.summary()


def dicom_source(request: DetectionRequest) -> Path:
    """The DICOM series folder the result's grid is that of (a fusion's reference contrast), or a clear refusal."""
    from ..detection.fusion import reference_contrast

    given = request.input
    if request.inputs:
        reference = reference_contrast(request.inputs)
        given = next(p for m, p in request.inputs.items() if normalise_modality(m) == reference)
    if not given or not Path(given).is_dir():
        raise BadInputError(f"--dicom-out needs the scan as a DICOM series folder (the SEG and the parametric map "
                            f"reference its images); {given} is not a folder")
    return Path(given)


def detect_case(job: CaseJob, reporter: Optional[Reporter] = None) -> dict:
    """The per-scan function: detect one case and write its folder; returns its summary row (`row`, `status`,
    `exit_code`, `seconds`). A failure that the same input gives again (bad input, a broken model) is returned as a
    failed row; any other exception is raised, for the runner to retry the case once."""
    reporter = reporter or Reporter()
    t = time.perf_counter()
    request = job.request
    try:
        det = detector_for(request)
        folder = Path(request.output)
        dicom = job.dicom
        if job.resume:
            earlier = complete_result(folder, det.model.name, request.output_format)
            if earlier is not None and dicom is not None and not _dicom_complete(dicom.folder):
                earlier = None
            if earlier is not None:
                return _row(job, "kept", earlier, "complete result of an earlier run", 0, time.perf_counter() - t)
        # an incomplete or other model's result in the folder (a resumed run) is replaced whole
        request = dataclasses.replace(request, overwrite=folder.exists())
        if dicom is not None:
            dicom = dataclasses.replace(dicom, overwrite=dicom.overwrite or (job.resume and dicom.folder.exists()))
        summary = detect_one(det, request, reporter, dicom)
    except REPEATABLE as exc:
        return _row(job, "failed", None, str(exc), exc.exit_code, time.perf_counter() - t)
    return _row(job, "ok", summary, "", 0, time.perf_counter() - t)


def _dicom_complete(folder: Path) -> bool:
    from ..core.dicom import DICOM_OUTPUTS

    return all((folder / name).is_file() for name in DICOM_OUTPUTS)


def failed_row(job: CaseJob, exc: BaseException) -> dict:
    """The row of a case whose per-scan call raised twice."""
    code = exc.exit_code if isinstance(exc, BrainAnomalyError) else 1
    return _row(job, "failed", None, f"{type(exc).__name__}: {exc}" if code == 1 else str(exc), code, 0.0)


def _row(job: CaseJob, status: str, summary: Optional[dict], message: str, code: int, seconds: float) -> dict:
    if summary is None:
        row = [job.subject, job.label, status, "", "", "", message]
    else:
        row = [job.subject, summary["modality"], "ok" if status == "kept" else status, summary["n_lesions"],
               summary["anomalous_volume_ml"], summary["pred_score"], message]
    return {"key": job.key, "row": row, "status": status, "exit_code": code, "seconds": seconds}

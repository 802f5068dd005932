"""`brainanomaly detect`: one scan, or every row of a manifest, through the detection pipeline and the one
writer."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import re
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

from ..core.errors import BadInputError, BrainAnomalyError, Cancelled
from ..core.manifest import normalise_modality
from ..core.progress import CancelToken, Reporter
from ..core.dicom import SEGMENTS
from ..detection.request import DetectionRequest, add_options
from .progress_bar import ProgressBar

SUMMARY_COLUMNS = ("subject", "modality", "status", "n_lesions", "anomalous_volume_ml", "pred_score", "message")


def add_parser(sub) -> None:
    p = sub.add_parser("detect", help="detect anomalies in a scan or a manifest of scans")
    p.add_argument("input", nargs="*", help="volume file (NIfTI, NRRD, MHA, ...) or DICOM series folder; for a "
                                            "fusion model (several contrasts of one session), one MODALITY=path "
                                            "per contrast, e.g. T1=t1.nii.gz T2=t2.nii.gz FLAIR=flair.nii.gz")
    p.add_argument("--manifest", help="CSV with subject,modality,image,mask: run every row (for a fusion model, "
                                      "each subject's rows of the model's contrasts together)")
    add_options(p)
    p.add_argument("-o", "--output", required=True,
                   help="output folder: new or empty (an earlier result there needs --overwrite; a folder holding "
                        "other files is refused); with --manifest, one subfolder per case and summary.csv, and "
                        "--overwrite replaces an earlier run's whole folder once the new run ends")
    p.add_argument("--dicom-out", metavar="DIR",
                   help="also write the findings as a DICOM SEG and the anomaly map as a DICOM Parametric Map "
                        "into DIR, referencing the input DICOM series (the input must be a DICOM series folder); "
                        "with --manifest, one subfolder per case. DIR follows the output folder rule of -o")
    p.add_argument("--dicom-segments", choices=SEGMENTS, default="findings",
                   help="the SEG's segments: one per finding, numbered as in lesions.csv (default), or one "
                        "'Anomaly' segment")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


@dataclasses.dataclass
class DicomOut:
    """Where `--dicom-out` writes a case's SEG and parametric map, and how."""

    folder: Path
    per_finding: bool = True
    # --overwrite, kept apart from the case requests': a manifest's -o is replaced whole, its DIR case by case.
    overwrite: bool = False


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


def _dicom_out(args, out: Path) -> Optional[DicomOut]:
    """--dicom-out's folder, checked against -o and the output folder rule before anything is computed."""
    from ..core.dicom import DICOM_OUTPUTS
    from ..detection.writers import check_output

    if not args.dicom_out:
        return None
    folder = Path(args.dicom_out).absolute()
    main = out.absolute()
    if folder == main or main in folder.parents or folder in main.parents:
        raise BadInputError("--dicom-out must be a folder apart from -o (neither inside the other)")
    check_output(folder, args.overwrite, extra=DICOM_OUTPUTS, cases=bool(args.manifest))
    return DicomOut(folder, args.dicom_segments == "findings", bool(args.overwrite))


def run(args, cancel: CancelToken) -> int:
    from ..detection.pipeline import Detector
    from ..detection.writers import check_output

    if bool(args.input) == bool(args.manifest):
        raise BadInputError("give either an input volume or --manifest CSV (not both)")
    args.input, args.inputs = parse_inputs(args.input)
    request = DetectionRequest.from_args(args)
    out = Path(args.output)
    check_output(out, request.overwrite, cases=bool(args.manifest))  # before anything is loaded or computed
    dicom = _dicom_out(args, out)
    if dicom is not None and not args.manifest:
        dicom_source(request)
    det = Detector.from_request(request)
    few = (det.model.meta.get("calibration") or {}).get("few_scans")
    if few:
        print(f"note: model {det.model.name}: {few['note']}", file=sys.stderr)
    if not args.manifest:
        bar = ProgressBar(args.quiet, "detect")
        try:
            s = detect_one(det, request, Reporter(bar, cancel), dicom)
        finally:
            bar.close()
        print_summary(s, out)
        if dicom is not None:
            print(f"DICOM SEG and parametric map in {dicom.folder}")
        return 0
    if det.model.kind == "fusion":
        return _run_fused_manifest(det, request, args.manifest, out, args.quiet, cancel, dicom)
    return _run_manifest(det, request, args.manifest, out, args.quiet, cancel, dicom)


_NAMED = re.compile(r"^([A-Za-z][A-Za-z0-9]*)=(.+)$")


def parse_inputs(items) -> Tuple[Optional[str], Optional[Dict[str, str]]]:
    """detect's positional inputs as (one volume, None) or (None, modality -> volume) for MODALITY=path items."""
    items = list(items or [])
    if not items:
        return None, None
    if len(items) == 1 and (Path(items[0]).exists() or not _NAMED.match(items[0])):
        return items[0], None
    named = [_NAMED.match(x) for x in items]
    if not all(named):
        raise BadInputError("with several inputs, name each one's contrast: MODALITY=path, e.g. T1=t1.nii.gz "
                            "FLAIR=flair.nii.gz")
    inputs: Dict[str, str] = {}
    for m in named:
        key = normalise_modality(m.group(1))
        if key in inputs:
            raise BadInputError(f"{key} is given twice")
        inputs[key] = m.group(2)
    return None, inputs


def _run_fused_manifest(det, request: DetectionRequest, manifest, out: Path, quiet: bool,
                        cancel: CancelToken, dicom: Optional[DicomOut] = None) -> int:
    """A fusion model on a manifest: each subject's rows of the model's contrasts are one case, written into
    OUT/<subject>/; rows of other contrasts are left out (and said so), a subject that fails is reported and the
    run goes on."""
    from ..core.manifest import group_by_subject, read_manifest, skipped_rows
    from ..detection.writers import SUMMARY, output_root

    skipped: list = []
    subjects = group_by_subject(read_manifest(manifest), det.modalities, skipped)
    why = f"model {det.model.name} fuses {', '.join(det.modalities)}"
    if skipped:
        print(skipped_rows(skipped, sum(len(v) for v in subjects.values()) + len(skipped), why))
    label = det.label(det.modalities)
    rows, failures = [], []
    with output_root(out, request.overwrite, cases=True) as root:
        bar = ProgressBar(quiet, "cohort")
        try:
            for i, (subject, cases) in enumerate(subjects.items()):
                rep = Reporter(bar, cancel).sub(i / len(subjects), (i + 1) / len(subjects))
                given = {c.modality: str(c.image) for c in cases}
                try:
                    one = dataclasses.replace(request, input=None, inputs=given, output=str(root / subject),
                                              modality=None, overwrite=False)
                    s = detect_one(det, one, rep, _case_dicom(dicom, subject))
                    rows.append([subject, s["modality"], "ok", s["n_lesions"], s["anomalous_volume_ml"],
                                 s["pred_score"], ""])
                except Cancelled:
                    raise
                except BrainAnomalyError as exc:
                    failures.append(f"{subject}: {exc}")
                    rows.append([subject, "+".join(given), "failed", "", "", "", str(exc)])
        finally:
            bar.close()
            if rows:
                _write_summary(root / SUMMARY, rows)
    print(f"{len(subjects) - len(failures)} of {len(subjects)} subjects done ({label}); outputs in "
          f"{out}/<subject>/, overview in {out / SUMMARY}")
    for f in failures:
        print(f"failed: {f}", file=sys.stderr)
    return 2 if failures else 0


def _run_manifest(det, request: DetectionRequest, manifest, out: Path, quiet: bool, cancel: CancelToken,
                  dicom: Optional[DicomOut] = None) -> int:
    """Every row of the model's modality, each into OUT/<subject>_<modality>/; a failing case is reported and the
    run goes on. Replacing an earlier run (--overwrite), the new set is built aside and swapped in at the end."""
    from ..core.manifest import read_manifest, skipped_rows
    from ..detection.writers import SUMMARY, output_root

    modality = request.modality or det.model.modality
    skipped = []
    cases = read_manifest(manifest, modality, skipped)
    keys = [c.key for c in cases]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise BadInputError(f"{manifest}: more than one row for {', '.join(twice)} (subject and modality name a "
                            "case's output folder)")
    why = (f"--modality {request.modality} was asked for" if request.modality
           else f"this model is for {det.model.modality}")
    if skipped:
        print(skipped_rows(skipped, len(cases) + len(skipped), why))
    rows = [[c.subject, c.modality, "skipped", "", "", "", f"modality {c.modality}, {why}"] for c in skipped]
    failures = []
    with output_root(out, request.overwrite, cases=True) as root:
        bar = ProgressBar(quiet, "cohort")
        try:
            for i, case in enumerate(cases):
                rep = Reporter(bar, cancel).sub(i / len(cases), (i + 1) / len(cases))
                one = dataclasses.replace(request, input=str(case.image), output=str(root / case.key),
                                          modality=case.modality, overwrite=False)
                try:
                    s = detect_one(det, one, rep, _case_dicom(dicom, case.key))
                    rows.append([case.subject, case.modality, "ok", s["n_lesions"], s["anomalous_volume_ml"],
                                 s["pred_score"], ""])
                except Cancelled:
                    raise
                except BrainAnomalyError as exc:
                    failures.append(f"{case.key}: {exc}")
                    rows.append([case.subject, case.modality, "failed", "", "", "", str(exc)])
        finally:
            bar.close()
            if len(rows) > len(skipped):
                _write_summary(root / SUMMARY, rows)
    print(f"{len(cases) - len(failures)} of {len(cases)} {modality} scans done; outputs in "
          f"{out}/<subject>_<modality>/, overview in {out / SUMMARY}")
    for f in failures:
        print(f"failed: {f}", file=sys.stderr)
    return 2 if failures else 0


def _case_dicom(dicom: Optional[DicomOut], key: str) -> Optional[DicomOut]:
    return dataclasses.replace(dicom, folder=dicom.folder / key) if dicom is not None else None


def _write_summary(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(SUMMARY_COLUMNS)
        w.writerows(rows)


def print_summary(s: dict, out: Path) -> None:
    t = s["threshold"]
    if t.get("false_findings") is not None:
        what = (f"findings that healthy scans produce at most {t['false_findings']:g} times per scan; cut at "
                f"{t['value']:.4g}, the {t['fpr']:.0%} healthy voxel FPR")
    else:
        what = f"healthy FPR {t['fpr']:.2%}" if t.get("fpr") else t["source"]
    if "adaptive" in t:
        what += f", scan-adaptive from {t['cohort_value']:.4g}"
    print(f"model {s['model']['name']} ({s['modality']}); threshold {t['value']:.4g} ({what}); "
          f"{s['n_lesions']} finding(s), {s['anomalous_volume_ml']:.2f} mL; scan score {s['pred_score']:.3f}")
    for les in s["lesions"][:5]:
        rate = les.get("healthy_rate")
        seen = f"; healthy scans: {rate:.2g} such findings per scan" if rate is not None else ""
        r, a, z = les["centroid_ras"]
        print(f"  #{les['label']}: {les['volume_ml']:.2f} mL at RAS ({r:.0f}, {a:.0f}, {z:.0f}){seen}")
    if len(s["lesions"]) > 5:
        print(f"  ... {len(s['lesions']) - 5} more in lesions.csv")
    for note in s["notes"]:
        print(f"note: {note}")
    print(f"outputs in {out}")

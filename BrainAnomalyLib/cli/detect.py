"""`brainanomaly detect`: one scan, or every row of a manifest, through the detection pipeline and the one
writer."""

from __future__ import annotations

import csv
import dataclasses
import sys
from pathlib import Path

from ..core.errors import BadInputError, BrainAnomalyError, Cancelled
from ..core.progress import CancelToken, Reporter
from ..detection.request import DetectionRequest, add_options
from .progress_bar import ProgressBar

SUMMARY_COLUMNS = ("subject", "modality", "status", "n_lesions", "anomalous_volume_ml", "pred_score", "message")


def add_parser(sub) -> None:
    p = sub.add_parser("detect", help="detect anomalies in a scan or a manifest of scans")
    p.add_argument("input", nargs="?", help="volume file (NIfTI, NRRD, MHA, ...) or DICOM series folder")
    p.add_argument("--manifest", help="CSV with subject,modality,image,mask: run every row")
    add_options(p)
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def detect_one(det, request: DetectionRequest, reporter: Reporter) -> dict:
    """Detect on the request's input and write the outputs into its output folder; the summary written."""
    from ..detection.writers import write_result

    result, scan = det.run_request(request, reporter.sub(0.0, 0.95))
    write_result(result, scan, request.output, request.output_format, Path(request.input).name,
                 reporter.sub(0.95, 1.0))
    return result.summary()


def run(args, cancel: CancelToken) -> int:
    from ..detection.pipeline import Detector

    if bool(args.input) == bool(args.manifest):
        raise BadInputError("give either an input volume or --manifest CSV (not both)")
    request = DetectionRequest.from_args(args)
    det = Detector.from_request(request)
    out = Path(args.output)
    if args.input:
        bar = ProgressBar(args.quiet, "detect")
        try:
            s = detect_one(det, request, Reporter(bar, cancel))
        finally:
            bar.close()
        print_summary(s, out)
        return 0
    from ..core.manifest import read_manifest

    # Rows of other contrasts are for other models: run only those this model was built for.
    cases = read_manifest(args.manifest, request.modality or det.model.modality)
    bar = ProgressBar(args.quiet, "cohort")
    rows, failures = [], []
    try:
        for i, case in enumerate(cases):
            rep = Reporter(bar, cancel).sub(i / len(cases), (i + 1) / len(cases))
            one = dataclasses.replace(request, input=str(case.image), output=str(out / case.key),
                                      modality=case.modality)
            try:
                s = detect_one(det, one, rep)
                rows.append([case.subject, case.modality, "ok", s["n_lesions"], s["anomalous_volume_ml"],
                             s["pred_score"], ""])
            except Cancelled:
                raise
            except BrainAnomalyError as exc:
                failures.append(f"{case.key}: {exc}")
                rows.append([case.subject, case.modality, "failed", "", "", "", str(exc)])
    finally:
        bar.close()
        if rows:
            _write_summary(out / "summary.csv", rows)
    print(f"{len(cases) - len(failures)} of {len(cases)} scans done; outputs in {out}/<subject>_<modality>/, "
          f"overview in {out / 'summary.csv'}")
    for f in failures:
        print(f"failed: {f}", file=sys.stderr)
    return 2 if failures else 0


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

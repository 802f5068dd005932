"""`brainanomaly detect`: one scan, or every row of a manifest, through the detection pipeline and the one
writer."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

from ..core.errors import BadInputError
from ..core.manifest import normalise_modality
from ..core.progress import CancelToken, Reporter
from ..core.dicom import SEGMENTS
from ..detection.request import DetectionRequest, add_options
from .progress_bar import ProgressBar


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
    p.add_argument("--workers", type=int, help="with --manifest: worker processes, each loading the model once "
                   "(default: one per core, as many as the free memory holds; 1 runs the cases in this process)")
    p.add_argument("--dask", nargs="?", const="local", metavar="ADDRESS",
                   help="with --manifest: run the cases on Dask distributed, on a local cluster of --workers "
                        "processes, or on the scheduler at ADDRESS (e.g. tcp://host:8786, one dask-jobqueue started)")
    p.add_argument("--resume", action="store_true", help="with --manifest: keep the cases that an earlier run into "
                   "the same folder completed, run the others")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _dicom_out(args, out: Path):
    """--dicom-out's folder (a cohort.DicomOut), checked against -o and the output folder rule before anything is
    computed."""
    from ..core.dicom import DICOM_OUTPUTS
    from ..detection.writers import check_output
    from .cohort import DicomOut

    if not args.dicom_out:
        return None
    folder = Path(args.dicom_out).absolute()
    main = out.absolute()
    if folder == main or main in folder.parents or folder in main.parents:
        raise BadInputError("--dicom-out must be a folder apart from -o (neither inside the other)")
    check_output(folder, args.overwrite or args.resume, extra=DICOM_OUTPUTS, cases=bool(args.manifest))
    return DicomOut(folder, args.dicom_segments == "findings", bool(args.overwrite))


def run(args, cancel: CancelToken) -> int:
    from ..detection.pipeline import Detector
    from ..detection.writers import check_output
    from .cohort import detect_one, dicom_source

    if bool(args.input) == bool(args.manifest):
        raise BadInputError("give either an input volume or --manifest CSV (not both)")
    if not args.manifest and (args.workers or args.dask or args.resume):
        raise BadInputError("--workers, --dask and --resume go with --manifest")
    if args.workers is not None and args.workers < 1:
        raise BadInputError("--workers must be at least 1")
    if args.resume and args.overwrite:
        raise BadInputError("--resume keeps an earlier run's cases and --overwrite replaces them: give one")
    args.input, args.inputs = parse_inputs(args.input)
    request = DetectionRequest.from_args(args)
    out = Path(args.output)
    # before anything is loaded or computed
    check_output(out, request.overwrite or args.resume, cases=bool(args.manifest))
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
    from .cohort_run import run_manifest

    return run_manifest(det, request, args, cancel, dicom)


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

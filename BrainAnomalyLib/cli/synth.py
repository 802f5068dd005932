"""`brainanomaly synth`: write a synthetic-anomaly benchmark cohort from healthy scans or the template."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..core.errors import BadInputError
from ..core.progress import CancelToken, Reporter
from ..synth.kinds import KINDS
from .progress_bar import ProgressBar


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("synth", help="insert seeded synthetic lesions and artefacts (with exact masks) "
                                            "into healthy scans, for benchmarking")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--manifest", help="CSV with subject,modality,image,mask: healthy rows (no mask) are used")
    src.add_argument("--template", action="store_true", help="use the bundled 1 mm MNI T1 template")
    p.add_argument("--modality", default="T1", help="contrast of the scans: T1, T1CE, T2, FLAIR (default T1)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated kinds (default all: {','.join(KINDS)})")
    p.add_argument("--per-scan", type=int, default=1, help="cases of each kind per scan (default 1)")
    p.add_argument("--seed", type=int, default=0, help="master seed (default 0)")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def run(args, cancel: CancelToken) -> int:
    from ..core.manifest import read_manifest, skipped_rows
    from ..synth.cohort import check_kinds, make_cohort

    kinds = check_kinds(args.kinds.split(","))
    cases, other = None, []
    if not args.template:
        cases = read_manifest(args.manifest, args.modality, other)
    if other:
        print(skipped_rows(other, len(cases) + len(other), f"synthesising {args.modality.upper()} cases"),
              file=sys.stderr)
    if args.per_scan < 1:
        raise BadInputError("--per-scan must be at least 1")
    bar = ProgressBar(args.quiet, "synth")
    try:
        csv_path = make_cohort(cases, Path(args.output), args.modality, kinds, per_scan=args.per_scan,
                               seed=args.seed, reporter=Reporter(bar, cancel))
    finally:
        bar.close()
    out = csv_path.parent
    info = json.loads((out / "synth.json").read_text(encoding="utf-8"))
    print(f"{len(info['cases'])} synthetic case(s) in {out}: lesions in {csv_path.name}, artefacts in "
          "artefacts.csv, records in synth.json")
    for f in info["failures"]:
        print(f"failed: {f['subject']}: {f['error']}", file=sys.stderr)
    return 2 if info["failures"] else 0

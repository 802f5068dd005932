"""`detect --manifest` from start to end: the output folder, the engine (this process, a process pool, Dask), the
summary (rewritten as each case finishes, so a run stopped half-way leaves a true one) and the throughput line."""

from __future__ import annotations

import csv
import io
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict

from ..core.errors import BadInputError
from ..core.files import write_atomic
from ..core.progress import CancelToken, Reporter
from ..core.workers import default_workers, threads_per_worker
from ..detection.request import DetectionRequest
from .cohort import SUMMARY_COLUMNS, manifest_jobs, remember_detector
from .progress_bar import ProgressBar


def run_manifest(det, request: DetectionRequest, args, cancel: CancelToken, dicom=None) -> int:
    """Run every case of `args.manifest`; exit 0 when all are done, else the exit code of the first failure
    (core/errors.py: 2 bad input, 3 model, 4 out of memory, 1 anything else). `dicom` (cohort.DicomOut): each case's
    SEG and parametric map go into DIR/<case>/."""
    from ..detection.writers import SUMMARY, output_root
    from . import cohort_engines as engines

    out = Path(args.output).absolute()
    with _cases_root(out, request.overwrite, args.resume, output_root) as root:
        jobs, skipped, what = manifest_jobs(det, request, args.manifest, root, args.resume, dicom)
        remember_detector(request, det)  # the sequential engine reuses the detector loaded to check the model
        workers = args.workers or default_workers(len(jobs))
        threads = threads_per_worker(workers)
        order = {job.key: i for i, job in enumerate(jobs)}
        rows: Dict[str, dict] = {}

        def done(job, row: dict) -> None:
            rows[job.key] = row
            _write_summary(root / SUMMARY, skipped + [rows[k]["row"] for k in sorted(rows, key=order.get)])

        bar = ProgressBar(args.quiet, "cohort")
        reporter = Reporter(bar, cancel)
        started = time.perf_counter()
        try:
            if args.dask:
                cluster, n = engines.run_dask(jobs, done, reporter, None if args.dask == "local" else args.dask,
                                              workers, threads)
                where = f"on {cluster} ({n} workers)"
            elif workers == 1:
                where = "in this process"
                engines.run_sequential(jobs, done, reporter)
            else:
                where = f"on {workers} worker processes"
                engines.run_pool(jobs, done, reporter, workers)
        finally:
            bar.close()
            if skipped and not rows:
                _write_summary(root / SUMMARY, skipped)
        seconds = time.perf_counter() - started
    ran = [r for r in rows.values() if r["status"] != "kept"]
    failures = [r for r in rows.values() if r["status"] == "failed"]
    ok = len(rows) - len(failures)
    kept = len(rows) - len(ran)
    print(f"{ok} of {len(jobs)} {what} done" + (f" ({kept} kept from an earlier run)" if kept else "")
          + f"; outputs in {out}/<case>/, overview in {out / SUMMARY}")
    if ran:
        print(f"throughput: {len(ran)} cases in {seconds:.1f} s {where}, {len(ran) / seconds * 60:.2f} cases/min")
    for r in failures:
        print(f"failed: {r['key']}: {r['row'][-1]}", file=sys.stderr)
    return failures[0]["exit_code"] if failures else 0


def _cases_root(out: Path, overwrite: bool, resume: bool, output_root):
    """The folder the case folders go into: with `resume` the output folder itself (its complete cases are kept),
    else detection/writers.output_root (a new folder filled as cases finish, or an earlier run replaced whole at
    the end with --overwrite)."""
    if not resume:
        return output_root(out, overwrite, cases=True)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadInputError(f"cannot write to {out}: {exc.strerror or exc}") from None
    return nullcontext(out)


def _write_summary(path: Path, rows) -> None:
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(SUMMARY_COLUMNS)
    w.writerows(rows)
    write_atomic(path, buf.getvalue())

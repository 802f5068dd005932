"""Where `detect --manifest` runs its cases: in this process, in a pool of worker processes on this machine, or on a
Dask cluster (a local one, or an existing scheduler, e.g. one that dask-jobqueue started on SLURM). Each engine
calls the same per-scan function (cohort.detect_case), hands each row back as its case finishes, and retries a case
whose call raised once before reporting it as failed.

Each worker gets its share of the cores (core/workers.pin_threads); preprocessing gives the same numbers whatever
the thread count (preprocess/itkrun.py), so a case's outputs are the same bytes whichever engine ran it."""

from __future__ import annotations

import uuid
from typing import Callable, List, Optional, Tuple

from ..core.errors import BadInputError, Cancelled
from ..core.progress import Reporter
from ..core.workers import pin_threads, spawn_pool, stop_pool
from .cohort import CaseJob, detect_case, failed_row

RETRIES = 1

Done = Callable[[CaseJob, dict], None]


def run_sequential(jobs: List[CaseJob], done: Done, reporter: Reporter) -> None:
    for i, job in enumerate(jobs):
        rep = reporter.sub(i / len(jobs), (i + 1) / len(jobs))
        for attempt in range(RETRIES + 1):
            try:
                row = detect_case(job, rep)
                break
            except Cancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - a crash of one case must not stop the cohort
                if attempt == RETRIES:
                    row = failed_row(job, exc)
        done(job, row)


def run_pool(jobs: List[CaseJob], done: Done, reporter: Reporter, workers: int) -> None:
    """A process pool on this machine; each process loads the model on its first case and keeps it."""
    from concurrent.futures import FIRST_COMPLETED, wait

    tries = {job.key: 0 for job in jobs}
    todo, finished = list(jobs), 0
    while todo:
        # A worker that dies breaks the whole pool: every case still in it raises, counts a try and is run again
        # in a new pool.
        pool = spawn_pool(workers)
        try:
            running = {pool.submit(detect_case, job): job for job in todo}
            todo = []
            while running:
                ready, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                reporter.check()
                for fut in ready:
                    job = running.pop(fut)
                    try:
                        row = fut.result()
                    except Exception as exc:  # noqa: BLE001 - the case's own error, or a killed worker's
                        tries[job.key] += 1
                        if tries[job.key] <= RETRIES:
                            todo.append(job)
                            continue
                        row = failed_row(job, exc)
                    finished += 1
                    reporter(f"cohort: {finished} of {len(jobs)} done", finished / len(jobs))
                    done(job, row)
        except (Cancelled, KeyboardInterrupt):
            stop_pool(pool)  # a detection in a worker has no cancel token
            raise
        pool.shutdown(wait=True)


def run_dask(jobs: List[CaseJob], done: Done, reporter: Reporter, address: Optional[str], workers: int,
             threads: int) -> Tuple[str, int]:
    """Dask distributed: a local cluster of `workers` processes, or the scheduler at `address`. Returns (where it
    ran, its workers)."""
    try:
        from distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise BadInputError("--dask needs the 'distributed' package (pip install distributed)") from None
    cluster = None
    try:
        if address:
            client = Client(address, timeout="30s")
        else:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                                   silence_logs=40)
            client = Client(cluster)
    except (OSError, TimeoutError) as exc:
        raise BadInputError(f"cannot reach the Dask scheduler {address or '(local)'}: {exc}") from None
    try:
        if cluster is not None:  # an existing cluster's workers keep the threads their own configuration gave
            client.run(pin_threads, threads)
        n_workers = len(client.scheduler_info().get("workers", {}))
        # Keys are the scheduler's, shared by everyone's runs on it: this run's own token keeps them apart.
        run = uuid.uuid4().hex[:8]
        futures = {client.submit(detect_case, job, retries=RETRIES, pure=False, key=f"detect-{job.key}-{run}"): job
                   for job in jobs}
        finished = 0
        try:
            for fut in as_completed(futures):
                job = futures[fut]
                try:
                    row = fut.result()
                except Exception as exc:  # noqa: BLE001 - raised twice (Dask retried it once)
                    row = failed_row(job, exc)
                finished += 1
                reporter(f"cohort: {finished} of {len(jobs)} done", finished / len(jobs))
                done(job, row)
        except (Cancelled, KeyboardInterrupt):
            client.cancel(list(futures))
            raise
        return (f"the Dask cluster at {address}" if address else "a local Dask cluster"), n_workers
    finally:
        client.close()
        if cluster is not None:
            cluster.close()

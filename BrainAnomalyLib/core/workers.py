"""Worker processes on this machine: how many (`default_workers`), with how many threads each (`pin_threads`), started
the one way that is safe beside torch's and ITK's thread pools (`spawn_pool`). `detect --manifest`, `evaluate` and
scripts/benchmark.py all size their pools here."""

from __future__ import annotations

import os
import signal
from typing import Callable, Optional

# What one detection worker may hold at its peak: the memory side of the default worker count. Measured 1.6 GB
# (maximum resident set, /usr/bin/time) for the default model on 2 mm IXI scans; the rest is room for 1 mm scans.
WORKER_PEAK_GB = 2.5


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers(n_jobs: int) -> int:
    """Workers for `n_jobs` pieces of work on this machine: one per core, as many as the free memory holds."""
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2 ** 30
    except (ValueError, OSError, AttributeError):
        available = WORKER_PEAK_GB * cores()
    return max(1, min(n_jobs, cores(), int(available // WORKER_PEAK_GB)))


def threads_per_worker(workers: int) -> int:
    return max(1, cores() // max(workers, 1))


def pin_threads(threads: int) -> None:
    """The thread counts of a worker: torch's and ITK's pools (and BLAS's, through the environment, for libraries
    not yet loaded)."""
    import SimpleITK as sitk
    import torch

    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    torch.set_num_threads(threads)


def _start(threads: int, setup: Optional[Callable], args: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the pool
    pin_threads(threads)
    if setup is not None:
        setup(*args)


def spawn_pool(workers: int, setup: Optional[Callable] = None, args: tuple = ()):
    """A process pool of `workers` spawned processes (fork would copy torch's and ITK's thread pools in a broken
    state), each with its share of the cores and `setup(*args)` run once in it."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), initializer=_start,
                               initargs=(threads_per_worker(workers), setup, args))


def stop_pool(pool) -> None:
    """Stop a pool at once (a cancel): its workers are terminated, queued work dropped."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.terminate()
    pool.shutdown(wait=True, cancel_futures=True)

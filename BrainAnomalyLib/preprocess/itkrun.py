"""Run a SimpleITK filter or registration so a cancel request stops it between iterations."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import SimpleITK as sitk

from ..core.progress import Reporter

# The same scan must give the same bytes whatever the thread count (a worker process, a Dask worker, another machine).
# Registration's Mattes metric adds its samples into shared histograms from every work unit, in whichever order the
# threads come: one work unit makes it exact (its sums are a small share of the registration's time). N4's
# B-spline fit splits its sums by the global thread count: it runs with a fixed one. With the metric in one work
# unit, the rest of the registration (the pyramid's smoothing and shrinking, the moving image's resampling) may use
# two threads: on 4 BraTS scans (T1 and FLAIR) and a deepbet-stripped IXI T1, two runs each gave the transform of
# one thread bit for bit, in 10-29 % less time. With two metric work units the optimiser's path differed between
# runs of the same scan.
WORK_UNITS = 1
REGISTRATION_THREADS = 2
N4_THREADS = 2


@contextmanager
def itk_threads(n: int) -> Iterator[None]:
    """ITK's global default thread count set to `n` for the block (what filters made inside a filter use)."""
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def execute_cancellable(obj, reporter: Reporter, step: str, *args, abort=None, on_iteration=None):
    """Call obj.Execute(*args); abort it from an iteration callback when the user cancels."""
    stop = abort or obj.Abort

    def _tick():
        if reporter.cancel.cancelled:
            stop()
        elif on_iteration is not None:
            on_iteration()

    obj.AddCommand(sitk.sitkIterationEvent, _tick)
    try:
        result = obj.Execute(*args)
    except RuntimeError:
        reporter.check()  # a cancel shows as Cancelled, not as ITK's abort message
        raise
    finally:
        obj.RemoveAllCommands()
    reporter.check()
    return result

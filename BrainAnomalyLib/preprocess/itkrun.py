"""Run a SimpleITK filter or registration so a cancel request stops it between iterations."""

from __future__ import annotations

import SimpleITK as sitk

from ..core.progress import Reporter


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

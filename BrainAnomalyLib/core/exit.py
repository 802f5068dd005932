"""Ending a command's process once its work is done, without Python's module teardown.

After a detection, a normal interpreter exit frees every module torch and MONAI loaded, one by one: 1.2-1.4 s on
the 2-core machine after the outputs were written and closed, during which a shell (or the Slicer module, which
waits for its worker process to end) waits for nothing.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Optional


def leave(code: Optional[int]) -> None:
    """Run what a normal exit runs (exit handlers: logging's flush, multiprocessing's and weakref finalizers), flush
    the standard streams, then end the process with `code` (None as 0, like sys.exit)."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(code if isinstance(code, int) else 0)

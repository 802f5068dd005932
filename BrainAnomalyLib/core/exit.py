"""Ending a command's process once its work is done, without Python's module teardown.

After a detection, a normal interpreter exit frees every module torch (and MONAI, where a model used it) loaded, one
by one: 1.2-1.4 s on the 2-core machine after the outputs were written and closed, during which a shell (or the
Slicer module, which waits for its worker process to end) waits for nothing.
"""

from __future__ import annotations

import atexit
import os
import sys
from typing import Callable, Optional


# What a Unix tool killed by SIGPIPE reports: its reader (`| head`) closed the pipe before the output ended.
CLOSED_PIPE = 141


def leave(code: Optional[int]) -> None:
    """Run what a normal exit runs (exit handlers: logging's flush, multiprocessing's and weakref finalizers), flush
    the standard streams, then end the process with `code` (None as 0, like sys.exit; a successful command whose
    output could not all be written because the reader closed the pipe, CLOSED_PIPE)."""
    code = code if isinstance(code, int) else 0
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BrokenPipeError:
            code = code or CLOSED_PIPE
        except (OSError, ValueError):  # a stream closed otherwise: nothing more can reach it
            pass
    os._exit(code)


def run_command(main: Callable[[], Optional[int]]) -> None:
    """`main()` as a command's whole process: ended by `leave`; a reader that closed the output pipe ends it quietly
    with CLOSED_PIPE (the work's own clean-up has run: the error came up through it), not with a traceback."""
    try:
        code = main()
    except BrokenPipeError:
        # Nothing more can be written there; point the stream at nothing so the final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = CLOSED_PIPE
    leave(code)

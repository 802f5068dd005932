"""Work started on a thread ahead of its need: a scan's networks (and with them the seconds of importing torch and
MONAI where a model needs it) load while the scan is preprocessed, whose SimpleITK filters release the GIL.

Two threads importing the same packages at once can deadlock on Python's import locks (or see a module half made),
so code on the main thread that imports torch while such work may run calls `settle()` first.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional, Set

from .progress import Reporter

# How often a wait looks at the cancel token: the signal handlers only set it.
POLL_SECONDS = 0.1

_RUNNING: Set["Background"] = set()
_GUARD = threading.Lock()


class Background:
    """`fn()` on a daemon thread (a process that fails or is cancelled meanwhile exits without waiting for it);
    `result()` waits for it and raises what it raised, as if it had run there. A short `fn` inside SimpleITK can be
    `daemon=False`: an interpreter that ends while a daemon thread runs ITK code aborts (exit code 134, "FATAL:
    exception not rethrown"), so the exit waits for it instead (the commands end with os._exit, core/exit.py, and
    never wait)."""

    def __init__(self, fn: Callable[[], object], name: str = "background", daemon: bool = True) -> None:
        self._fn = fn
        self._value: object = None
        self._error: Optional[BaseException] = None
        self.seconds: Optional[float] = None  # how long `fn` ran, once it ended
        self._thread = threading.Thread(target=self._run, name=name, daemon=daemon)
        with _GUARD:
            _RUNNING.add(self)
        self._thread.start()

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            self._value = self._fn()
        except BaseException as exc:  # handed to the waiting thread, which raises it
            self._error = exc
        finally:
            self.seconds = time.perf_counter() - started
            with _GUARD:
                _RUNNING.discard(self)

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, reporter: Optional[Reporter] = None) -> None:
        """Wait for the thread to end; a cancel (Ctrl-C, the viewer's stop) ends the wait at once."""
        while self._thread.is_alive():
            if reporter is not None:
                reporter.check()
            self._thread.join(POLL_SECONDS)

    def result(self, reporter: Optional[Reporter] = None) -> object:
        self.wait(reporter)
        if self._error is not None:
            raise self._error
        return self._value


def settle(reporter: Optional[Reporter] = None) -> None:
    """Wait for every background work still running (its errors stay for its own `result()`)."""
    with _GUARD:
        running = list(_RUNNING)
    for work in running:
        work.wait(reporter)

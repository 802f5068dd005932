"""Progress reporting and cooperative cancellation shared by every long step."""

from __future__ import annotations

import threading
from typing import Callable, Optional

from .errors import Cancelled

ProgressFn = Callable[[str, float], None]


def no_progress(step: str, fraction: float) -> None:
    return None


class CancelToken:
    """A flag that long steps poll; thread-safe so a UI thread or signal handler can set it."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by user")


class Reporter:
    """Bundles a progress callback and a cancel token; `sub` maps a step's 0..1 onto a slice of the whole."""

    def __init__(self, progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
                 lo: float = 0.0, hi: float = 1.0) -> None:
        self.progress = progress or no_progress
        self.cancel = cancel or CancelToken()
        self.lo, self.hi = lo, hi

    def __call__(self, step: str, fraction: float) -> None:
        self.cancel.check()
        f = min(max(fraction, 0.0), 1.0)
        self.progress(step, self.lo + (self.hi - self.lo) * f)

    def check(self) -> None:
        self.cancel.check()

    def sub(self, lo: float, hi: float) -> "Reporter":
        span = self.hi - self.lo
        return Reporter(self.progress, self.cancel, self.lo + span * lo, self.lo + span * hi)

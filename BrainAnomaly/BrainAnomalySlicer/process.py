"""A child process that speaks one JSON object per stdout line, read without blocking the caller's (GUI) thread,
and stopped with its whole process tree on cancel. No Slicer import: tests run it with any Python."""

from __future__ import annotations

import collections
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Deque, Dict, List, Optional, Sequence


class InferenceProcess:
    def __init__(self, command: Sequence[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None,
                 stderr_lines: int = 200) -> None:
        self.command = list(command)
        self.env = env
        self.cwd = cwd
        self.proc: Optional[subprocess.Popen] = None
        self._events: "queue.Queue[dict]" = queue.Queue()
        self.stderr: Deque[str] = collections.deque(maxlen=stderr_lines)
        self._readers: List[threading.Thread] = []
        self.cancelled = False
        self._kill_at: Optional[float] = None

    def start(self) -> "InferenceProcess":
        self.proc = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, env=self.env, cwd=self.cwd, text=True,
                                     encoding="utf-8", errors="replace", bufsize=1, **popen_options())
        for target, stream in ((self._read_stdout, self.proc.stdout), (self._read_stderr, self.proc.stderr)):
            t = threading.Thread(target=target, args=(stream,), daemon=True)
            t.start()
            self._readers.append(t)
        return self

    def _read_stdout(self, stream) -> None:
        for line in stream:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
                if not isinstance(event, dict) or "event" not in event:
                    raise ValueError
            except ValueError:
                event = {"event": "log", "message": line}
            self._events.put(event)

    def _read_stderr(self, stream) -> None:
        for line in stream:
            self.stderr.append(line.rstrip("\n"))

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> Optional[int]:
        return None if self.proc is None else self.proc.poll()

    def events(self) -> List[dict]:
        """Events that arrived since the last call (never blocks)."""
        out = []
        while True:
            try:
                out.append(self._events.get_nowait())
            except queue.Empty:
                return out

    def finished(self) -> bool:
        """True once the process has exited and everything it printed has been read."""
        if self.running:
            return False
        for t in self._readers:
            t.join(timeout=5)
        return True

    def wait(self, timeout: Optional[float] = None) -> Optional[int]:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self.finished()
        return self.proc.returncode

    def request_cancel(self, grace_seconds: float = 3.0) -> None:
        """Ask the whole tree to stop and return at once; `enforce_cancel` kills it once the grace period is over
        (a GUI calls that from its poll timer, so it never waits). Never raises: a polite signal that cannot be
        delivered (CTRL_BREAK_EVENT fails for a process without a console) only brings the kill forward."""
        self.cancelled = True
        if not self.running or self._kill_at is not None:
            return
        self._kill_at = time.monotonic() + grace_seconds  # set first, so a failing signal cannot leave it unset
        try:
            self._signal_tree(graceful=True)
        except (OSError, ValueError):
            self._kill_at = time.monotonic()

    def enforce_cancel(self) -> None:
        if self._kill_at is not None and self.running and time.monotonic() >= self._kill_at:
            self._signal_tree(graceful=False)

    def cancel(self, grace_seconds: float = 3.0) -> None:
        """Stop the whole tree and wait until it is gone: politely first, killed after the grace period."""
        self.request_cancel(grace_seconds)
        while self.running:
            self.enforce_cancel()
            time.sleep(0.05)
        if self.proc is not None:
            self.proc.wait()
            self.finished()

    def _signal_tree(self, graceful: bool) -> None:
        pid = self.proc.pid
        if os.name == "nt":
            if graceful:
                self.proc.send_signal(signal.CTRL_BREAK_EVENT)
            else:
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True,  # no console flash
                               creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000))
            return
        try:
            os.killpg(os.getpgid(pid), signal.SIGTERM if graceful else signal.SIGKILL)
        except ProcessLookupError:
            pass

    def stderr_tail(self, lines: int = 15) -> str:
        return "\n".join(list(self.stderr)[-lines:])


def popen_options(os_name: Optional[str] = None) -> dict:
    """Popen keyword arguments that give the worker its own process group (so a cancel reaches its children too)
    and, on Windows, no console window of its own, as Slicer's launchConsoleProcess starts its processes."""
    if (os_name or os.name) != "nt":
        return {"start_new_session": True}
    # The flag values are Windows' own; getattr keeps this importable (and testable) elsewhere.
    flags = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x00000200) | getattr(subprocess, "CREATE_NO_WINDOW",
                                                                                 0x08000000)
    info = subprocess.STARTUPINFO()
    info.dwFlags |= getattr(subprocess, "STARTF_USESHOWWINDOW", 0x00000001)
    info.wShowWindow = 0  # SW_HIDE
    return {"creationflags": flags, "startupinfo": info}


def python_executable() -> str:
    """The interpreter for the worker: PythonSlicer inside the Slicer application (Slicer's Python with its
    environment set up; it is on Slicer's PATH), else this interpreter (pytest, plain Python)."""
    import shutil

    slicer = sys.modules.get("slicer")
    if slicer is not None and hasattr(slicer, "app"):
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable

"""The worker's child process (BrainAnomalySlicer.process): how it is started on Windows, and a cancel that cannot
signal politely. Plain Python; no Slicer."""

from __future__ import annotations

import subprocess
import sys

import pytest

from BrainAnomalySlicer.process import InferenceProcess, popen_options


def test_windows_worker_gets_no_console_window_and_its_own_process_group(monkeypatch):
    # As Slicer's launchConsoleProcess starts its processes: CREATE_NO_WINDOW and a hidden STARTUPINFO.
    class StartupInfo:
        dwFlags = 0
        wShowWindow = 1

    monkeypatch.setattr(subprocess, "STARTUPINFO", StartupInfo, raising=False)
    options = popen_options("nt")
    assert options["creationflags"] & 0x08000000  # CREATE_NO_WINDOW
    assert options["creationflags"] & 0x00000200  # CREATE_NEW_PROCESS_GROUP: the cancel reaches the tree
    assert options["startupinfo"].dwFlags & 0x1 and options["startupinfo"].wShowWindow == 0  # SW_HIDE
    assert popen_options("posix") == {"start_new_session": True}


def test_cancel_whose_polite_signal_fails_still_kills_and_never_raises(monkeypatch):
    proc = InferenceProcess([sys.executable, "-c", "import time; time.sleep(60)"]).start()
    real = proc._signal_tree

    def signal_tree(graceful):
        if graceful:  # what CTRL_BREAK_EVENT does to a process without a console
            raise OSError("The parameter is incorrect")
        real(graceful)

    monkeypatch.setattr(proc, "_signal_tree", signal_tree)
    proc.request_cancel(grace_seconds=30.0)  # must not raise out of a button handler
    assert proc.cancelled and proc._kill_at is not None
    proc.enforce_cancel()  # the kill is due at once, not after the grace period
    assert proc.wait(timeout=10) is not None
    assert proc.returncode != 0


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process groups")
def test_cancel_stops_a_worker_that_ignores_nothing():
    proc = InferenceProcess([sys.executable, "-c", "import time; time.sleep(60)"]).start()
    proc.cancel(grace_seconds=5.0)
    assert not proc.running

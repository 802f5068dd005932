"""The `brainanomaly` command: builds the parser from one module per subcommand and dispatches to it."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from typing import List, Optional, Sequence

from .. import __version__
from ..core.errors import BrainAnomalyError, Cancelled
from ..core.exit import run_command
from ..core.progress import CancelToken
# In the order `brainanomaly --help` lists them; each is the module of that name here.
COMMANDS = ("detect", "demo", "view", "train", "evaluate", "models", "ensemble", "synth", "calibrate")


def _command(name: str):
    # Imported when the parser is built, not with this module: `commands` can leave out the ones whose imports a
    # host lacks (a GPU host training from a pack has no SimpleITK; see scripts/gpu_train.py).
    return importlib.import_module(f"{__package__}.{name}")


def build_parser(commands: Sequence[str] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainanomaly", description="Unsupervised anomaly detection in brain MRI.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in commands:
        _command(name).add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None, commands: Sequence[str] = COMMANDS) -> int:
    args = build_parser(commands).parse_args(argv)
    cancel = CancelToken()

    def _on_sigint(signum, frame):
        if cancel.cancelled:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        cancel.cancel()

    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        return _command(args.command).run(args, cancel)
    except KeyboardInterrupt:
        print("brainanomaly: cancelled", file=sys.stderr)
        return Cancelled.exit_code
    except BrainAnomalyError as exc:
        print(f"brainanomaly: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        signal.signal(signal.SIGINT, previous)


def entry() -> None:
    """The `brainanomaly` command: main() as the whole process (core.exit: no module teardown, a closed pipe quiet)."""
    run_command(main)


if __name__ == "__main__":
    entry()

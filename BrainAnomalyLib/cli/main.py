"""The `brainanomaly` command: builds the parser from one module per subcommand and dispatches to it."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import List, Optional

from .. import __version__
from ..core.errors import BrainAnomalyError, Cancelled
from ..core.progress import CancelToken
from . import calibrate, demo, detect, ensemble, evaluate, models, synth, train

# In the order `brainanomaly --help` lists them.
COMMANDS = {"detect": detect, "demo": demo, "train": train, "evaluate": evaluate, "models": models,
            "ensemble": ensemble, "synth": synth, "calibrate": calibrate}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainanomaly", description="Unsupervised anomaly detection in brain MRI.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add_parser(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    cancel = CancelToken()

    def _on_sigint(signum, frame):
        if cancel.cancelled:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        cancel.cancel()

    previous = signal.signal(signal.SIGINT, _on_sigint)
    try:
        return COMMANDS[args.command].run(args, cancel)
    except KeyboardInterrupt:
        print("brainanomaly: cancelled", file=sys.stderr)
        return Cancelled.exit_code
    except BrainAnomalyError as exc:
        print(f"brainanomaly: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        signal.signal(signal.SIGINT, previous)


if __name__ == "__main__":
    sys.exit(main())

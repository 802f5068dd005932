"""The command line's progress display, shared by every subcommand."""

from __future__ import annotations

import sys


class ProgressBar:
    """Progress for a terminal (a tqdm bar) or for a log (one line per step); silent with --quiet."""

    def __init__(self, quiet: bool, total_label: str = ""):
        self.bar = None
        self.quiet = quiet
        self.last_step = None
        self.last_n = -1
        if not quiet and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=1000, desc=total_label, bar_format="{desc:<38}{bar}| {percentage:3.0f}% "
                            "[{elapsed}<{remaining}]", file=sys.stderr, leave=False, mininterval=0.2)

    def __call__(self, step: str, fraction: float) -> None:
        if self.quiet:
            return
        n = int(1000 * fraction)
        if self.bar is None:
            if step != self.last_step:
                print(f"[{fraction:4.0%}] {step}", file=sys.stderr, flush=True)
        elif step != self.last_step or n - self.last_n >= 5:
            self.bar.set_description_str(step[:38], refresh=False)
            self.bar.update(n - self.bar.n)
        self.last_step, self.last_n = step, n

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

"""Progress of a long phase on stderr (`make bench`)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """One phase's progress on stderr: a bar redrawn in place on a terminal; otherwise (a CI
    log, a file) one line per phase, written when the phase ends."""

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty()
        self.started = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        if not self.interactive:
            return
        width = 30
        filled = int(width * min(done / total, 1.0)) if total else width
        self.stream.write(
            f"\r  {self.label:<34} [{'#' * filled}{'.' * (width - filled)}] "
            f"{done}/{total} {time.monotonic() - self.started:5.0f}s"
        )
        self.stream.flush()

    def done(self) -> float:
        """Ends the phase's line; returns the seconds it took."""
        elapsed = time.monotonic() - self.started
        took = f"done in {elapsed:.1f}s"
        if self.interactive:
            self.stream.write(f"\r  {self.label:<34} {took}" + " " * 40 + "\n")
        else:
            self.stream.write(f"  {self.label:<34} {took}\n")
        self.stream.flush()
        return round(elapsed, 1)

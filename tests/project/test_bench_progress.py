"""`make bench` progress: a bar redrawn in place on a terminal, one line per phase otherwise
(a CI log of the benchmark used to be one line of carriage returns)."""

from __future__ import annotations

import io

from bench.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run_phases(stream: io.StringIO) -> str:
    for label, total in (("seeding the world", 1), ("throughput, backlog 300", 900)):
        progress = Progress(label, stream)
        for done in range(0, total + 1, 7):
            progress(done, total)
        progress.done()
    return stream.getvalue()


def test_without_a_terminal_each_phase_is_one_line() -> None:
    text = _run_phases(io.StringIO())
    assert "\r" not in text
    lines = text.splitlines()
    assert len(lines) == 2
    assert lines[0].split()[:3] == ["seeding", "the", "world"]
    assert lines[1].startswith("  throughput, backlog 300") and lines[1].endswith("s")
    assert "896/900" not in text


def test_on_a_terminal_the_bar_is_redrawn_in_place() -> None:
    text = _run_phases(Terminal())
    assert text.count("\n") == 2
    assert text.count("\r") > 100
    assert "[##############################] 896/900" not in text  # 896 < 900: not full
    assert "] 896/900" in text

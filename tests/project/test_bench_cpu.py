"""`make bench`'s CPU seconds (bench/cpu.py), on a /proc tree written by the test around the
real backend of the test's connection: a backend that exits mid-phase is still counted in
the server's figure, once; a server that is not visible from here is "not measured"."""

from __future__ import annotations

from pathlib import Path

import psycopg
from psycopg.rows import DictRow

from bench import cpu
from tests.helpers import one

Conn = psycopg.Connection[DictRow]
POSTMASTER = 4000
TICK = int(cpu.TICK)


def stat_line(pid: int, name: str, ppid: int, utime: int, stime: int, cut: int = 0) -> str:
    # fields 3..17: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    # utime stime cutime cstime, then more that the parser ignores
    return f"{pid} ({name}) S {ppid} 1 1 0 -1 0 0 0 0 0 {utime} {stime} {cut} 0 20 0 1\n"


def write_proc(root: Path, processes: dict[int, tuple[str, int, int, int, int]], busy: int) -> None:
    """processes: pid -> (cmdline, ppid, utime, stime, cutime); a pid left out is gone."""
    for entry in root.glob("[0-9]*"):
        if int(entry.name) not in processes:
            for f in entry.iterdir():
                f.unlink()
            entry.rmdir()
    for pid, (cmdline, ppid, utime, stime, cut) in processes.items():
        folder = root / str(pid)
        folder.mkdir(exist_ok=True)
        (folder / "stat").write_text(stat_line(pid, "postgres", ppid, utime, stime, cut))
        (folder / "cmdline").write_bytes(cmdline.replace(" ", "\0").encode())
    (root / "stat").write_text(f"cpu  {busy} 0 0 99999 0 0 0 0 0 0\ncpu0 1 0 0 1 0 0 0 0 0 0\n")


def test_the_command_name_may_hold_spaces_and_parentheses() -> None:
    stat = cpu.parse_stat(stat_line(42, "python -m (x) y", 7, 150, 30, 12))
    assert (stat.ppid, stat.utime, stat.stime, stat.cutime) == (7, 150, 30, 12)
    assert (stat.own, stat.with_children) == (180, 192)


def test_a_backend_that_exits_mid_phase_is_counted_once(conn: Conn, tmp_path: Path) -> None:
    me = one(conn, "SELECT pg_backend_pid() AS pid, current_database() AS db")
    title = f"postgres: postgres {me['db']} 127.0.0.1(5000) idle"
    other = "postgres: postgres another_db 127.0.0.1(5001) idle"
    write_proc(
        tmp_path,
        {
            POSTMASTER: ("/usr/lib/postgresql/bin/postgres -D data", 1, 100, 50, 0),
            me["pid"]: (title, POSTMASTER, 10, 10, 0),
            4001: (other, POSTMASTER, 200, 100, 0),  # exits during the phase
            4002: ("postgres: walwriter", POSTMASTER, 5, 5, 0),
        },
        busy=10_000,
    )
    meter = cpu.Meter(conn, worker_pids=[], proc=tmp_path)
    assert meter.postmaster == POSTMASTER
    meter.start()
    write_proc(
        tmp_path,
        {
            # 4001 used 20 + 10 more ticks, then exited: reaped into the postmaster's cutime
            POSTMASTER: ("/usr/lib/postgresql/bin/postgres -D data", 1, 101, 50, 330),
            me["pid"]: (title, POSTMASTER, 12, 10, 0),
            4002: ("postgres: walwriter", POSTMASTER, 6, 5, 0),
            4003: ("postgres: autovacuum worker", POSTMASTER, 3, 0, 0),  # new
        },
        busy=10_000 + 50 * TICK,
    )
    meter.stop()
    figures = meter.figures()
    # 1 (postmaster) + 30 (4001 after the start) + 2 (me) + 1 (walwriter) + 3 (new)
    assert figures["postgres_cpu_s"] == round(37 / TICK, 2)
    assert figures["machine_busy_cpu_s"] == 50


def test_a_server_not_visible_from_here_is_not_measured(conn: Conn, tmp_path: Path) -> None:
    me = one(conn, "SELECT pg_backend_pid() AS pid")
    # the same pid here is some other program (another machine's or container's numbering)
    write_proc(tmp_path, {me["pid"]: ("/usr/bin/python3 app.py", 1, 5, 5, 0)}, busy=100)
    meter = cpu.Meter(conn, worker_pids=[], proc=tmp_path)
    meter.start()
    meter.stop()
    figures = meter.figures()
    assert figures["postgres_cpu_s"] is None and figures["postgres_db_cpu_s"] is None
    assert figures["other_cpu_s"] is None

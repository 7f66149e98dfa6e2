"""CPU seconds of a benchmark phase, read from /proc: the worker processes, the PostgreSQL
server, the benchmark's own process and the whole machine (whose remainder is other work:
the machine is shared).

- Workers: utime + stime (+ their waited children) of each worker process from
  /proc/<pid>/stat, sampled at the start and the end of the phase while they run; a worker
  that exits mid-phase is counted up to the last sample that saw it. Without pids (workers
  that exit by themselves, the baseline), the getrusage(RUSAGE_CHILDREN) delta: their whole
  lives, start-up included.
- PostgreSQL, the server: the postmaster's utime + stime + cutime + cstime plus utime + stime
  of each of its children, so a backend that exits mid-phase is still counted (its time
  moves into the postmaster's cutime/cstime when it is reaped). It is the whole server: on a
  shared server, other databases' work is in it.
- PostgreSQL, this database: the backends connected to the benchmark's database at the end
  of the phase (the workers' connections, not the benchmark's own), from their start or the
  phase's start; a backend that exits mid-phase is not in it.
- The server's processes are found from the benchmark connection's backend pid; when that
  pid is not a backend of this database as seen from here (another machine or container) or
  /proc is not readable, the PostgreSQL figures are None: "not measured".
"""

from __future__ import annotations

import os
import resource
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, LiteralString

import psycopg
from psycopg.rows import tuple_row

TICK = float(os.sysconf("SC_CLK_TCK"))
PROC = Path("/proc")


@dataclass(frozen=True)
class ProcStat:
    ppid: int
    utime: int
    stime: int
    cutime: int
    cstime: int

    @property
    def own(self) -> int:
        return self.utime + self.stime

    @property
    def with_children(self) -> int:
        return self.own + self.cutime + self.cstime


def parse_stat(text: str) -> ProcStat:
    """/proc/<pid>/stat: the command name is in parentheses and may hold spaces and ')', so
    the fields are counted from the last ')'."""
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state): ppid is field 4, utime..cstime are fields 14..17
    return ProcStat(
        ppid=int(fields[1]),
        utime=int(fields[11]),
        stime=int(fields[12]),
        cutime=int(fields[13]),
        cstime=int(fields[14]),
    )


def proc_stat(pid: int, proc: Path = PROC) -> ProcStat | None:
    try:
        return parse_stat((proc / str(pid) / "stat").read_text())
    except (OSError, ValueError, IndexError):
        return None  # gone, or not readable


def children_of(parent: int, proc: Path = PROC) -> dict[int, ProcStat]:
    stats = {
        int(entry.name): proc_stat(int(entry.name), proc)
        for entry in proc.iterdir()
        if entry.name.isdigit()
    }
    return {pid: stat for pid, stat in stats.items() if stat is not None and stat.ppid == parent}


def machine_busy_ticks(proc: Path = PROC) -> int:
    """All CPUs' busy time from /proc/stat: user nice system irq softirq steal (not idle or
    iowait; guest time is already in user)."""
    values = [int(v) for v in (proc / "stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal


def _rows(conn: psycopg.Connection[Any], query: LiteralString) -> list[tuple[Any, ...]]:
    with conn.cursor(row_factory=tuple_row) as cursor:
        return cursor.execute(query).fetchall()


def server_of(conn: psycopg.Connection[Any], proc: Path = PROC) -> int | None:
    """The postmaster's pid, if this connection's backend is visible here as a backend of
    this database; else None."""
    [(pid, database)] = _rows(conn, "SELECT pg_backend_pid(), current_database()")
    try:
        title = (proc / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, UnicodeDecodeError):
        return None
    stat = proc_stat(pid, proc)
    # A backend's title is "postgres: <user> <database> <client> <state>".
    if stat is None or f" {database} " not in f" {title} ":
        return None
    return stat.ppid if proc_stat(stat.ppid, proc) is not None else None


@dataclass
class Sample:
    workers: dict[int, int]
    children_rusage: float
    client: float
    machine: int
    server: int | None = None
    backends: dict[int, int] = field(default_factory=dict)


class Meter:
    """CPU seconds between start() and stop(); figures() reports them."""

    def __init__(
        self,
        conn: psycopg.Connection[Any],
        worker_pids: Sequence[int] | None = None,
        proc: Path = PROC,
    ) -> None:
        self.conn = conn
        self.worker_pids = worker_pids
        self.proc = proc
        self.postmaster = server_of(conn, proc)
        self.first: Sample | None = None
        self.last: Sample | None = None

    def sample(self) -> Sample:
        rusage = resource.getrusage(resource.RUSAGE_CHILDREN)
        me = resource.getrusage(resource.RUSAGE_SELF)
        workers = {}
        for pid in self.worker_pids or ():
            if (stat := proc_stat(pid, self.proc)) is not None:
                workers[pid] = stat.with_children
        sample = Sample(
            workers=workers,
            children_rusage=rusage.ru_utime + rusage.ru_stime,
            client=me.ru_utime + me.ru_stime,
            machine=machine_busy_ticks(self.proc),
        )
        if self.postmaster is not None:
            master = proc_stat(self.postmaster, self.proc)
            if master is not None:
                sample.server = master.with_children + sum(
                    s.own for s in children_of(self.postmaster, self.proc).values()
                )
            pids = _rows(
                self.conn,
                "SELECT pid FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            for (pid,) in pids:
                if (stat := proc_stat(int(pid), self.proc)) is not None:
                    sample.backends[int(pid)] = stat.own
        return sample

    def start(self) -> None:
        self.first = self.sample()

    def stop(self) -> None:
        self.last = self.sample()

    def figures(self) -> dict[str, Any]:
        first, last = self.first, self.last
        assert first is not None and last is not None, "start() and stop() first"
        if self.worker_pids is None:
            workers = last.children_rusage - first.children_rusage
        else:
            workers = sum(t - first.workers.get(pid, 0) for pid, t in last.workers.items()) / TICK
        server = db = None
        if first.server is not None and last.server is not None:
            server = (last.server - first.server) / TICK
            db = sum(t - first.backends.get(pid, 0) for pid, t in last.backends.items()) / TICK
        machine = (last.machine - first.machine) / TICK
        client = last.client - first.client
        other = None if server is None else machine - workers - server - client
        return {
            "workers_cpu_s": round(workers, 2),
            "workers_cpu_counts": "whole processes (start-up included)"
            if self.worker_pids is None
            else "while the phase ran",
            "postgres_cpu_s": None if server is None else round(server, 2),
            "postgres_db_cpu_s": None if db is None else round(db, 2),
            "bench_client_cpu_s": round(client, 2),
            "machine_busy_cpu_s": round(machine, 2),
            "other_cpu_s": None if other is None else round(other, 2),
        }

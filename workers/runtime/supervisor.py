"""`make run-workers`: N worker processes, each restarted if it dies, and the relay.

The supervisor migrates once, then starts `python -m workers run --single` N times with the
same DATABASE_URL, and, when REDIS_URL is set, one `python -m workers relay` (the business
events to Redis, workers/events/relay.py), kept alive the same way. A child that exits
without being asked to is logged and restarted after a backoff (1 s, doubling to 30 s; reset
once it has lived a minute). SIGTERM or SIGINT is passed on to every child; each finishes
its work in flight (KC_SHUTDOWN_SECONDS) and the supervisor exits 0 when all have stopped. A
supervisor that dies (even by SIGKILL) takes its children with it: each asked the kernel
for SIGTERM when its parent goes (exit_with_supervisor).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from workers.settings import Settings

log = logging.getLogger(__name__)


WORKER = ("run", "--single", "--no-migrate")
RELAY = ("relay",)


@dataclass
class Child:
    slot: int
    command: tuple[str, ...] = WORKER
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_delay: float = 1.0
    restart_at: float = 0.0
    restarts: int = field(default=0)


# Set for each worker process: it exits when this process (its supervisor) is gone.
SUPERVISOR_PID_VARIABLE = "KC_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_supervisor() -> None:
    """In a worker process: get SIGTERM (a clean stop) when the supervisor dies, even by
    SIGKILL, instead of running on as an orphan. Linux: PR_SET_PDEATHSIG; the parent pid
    check covers a supervisor that died before that call, and other systems at start."""
    expected = os.environ.get(SUPERVISOR_PID_VARIABLE)
    if not expected:
        return
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if str(os.getppid()) != expected:
        log.warning("supervisor (pid %s) is gone; this worker stops", expected)
        raise SystemExit(0)


def _spawn(child: Child, env: dict[str, str]) -> None:
    child.process = subprocess.Popen(
        [sys.executable, "-m", "workers", *child.command],
        env={**env, SUPERVISOR_PID_VARIABLE: str(os.getpid())},
    )
    child.started_at = time.monotonic()
    log.info("%s started (pid %d)", _name(child), child.process.pid)


def _name(child: Child) -> str:
    return "the relay" if child.command == RELAY else f"worker process {child.slot}"


def supervise(url: str, settings: Settings, processes: int) -> int:
    env = {**os.environ, "DATABASE_URL": url}
    children = [Child(slot) for slot in range(1, processes + 1)]
    if settings.redis_url is not None:
        children.append(Child(processes + 1, RELAY))
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            log.info("stopping %d process(es) (%s)", len(children), signal.Signals(signum).name)
        stopping = True
        for child in children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    for child in children:
        _spawn(child, env)

    while not stopping:
        time.sleep(0.2)
        now = time.monotonic()
        for child in children:
            if stopping or child.process is None:
                continue
            code = child.process.poll()
            if code is None:
                continue
            if child.restart_at == 0.0:
                if now - child.started_at > 60:
                    child.restart_delay = 1.0
                log.warning(
                    "%s (pid %d) exited with %s; restarting in %.0fs",
                    _name(child),
                    child.process.pid,
                    code,
                    child.restart_delay,
                )
                child.restart_at = now + child.restart_delay
                child.restart_delay = min(child.restart_delay * 2, 30.0)
            elif now >= child.restart_at:
                child.restart_at = 0.0
                child.restarts += 1
                _spawn(child, env)

    deadline = time.monotonic() + settings.shutdown_seconds + 10
    for child in children:
        if child.process is None:
            continue
        try:
            child.process.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in time; killing it", _name(child))
            child.process.kill()
            child.process.wait()
    log.info("all worker processes stopped")
    return 0

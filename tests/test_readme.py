"""README.md's "Your first payment" runs as written and ends with an approved allocation and
its sessions: a newcomer's first try is part of the suite."""

from __future__ import annotations

import os
import re
import subprocess

import psycopg
from psycopg.rows import DictRow

from tests.helpers import drain, one
from workers.settings import REPO_ROOT

Conn = psycopg.Connection[DictRow]

PAYMENT = "90000000-0000-4000-8000-000000000001"


def readme_block(name: str) -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(rf"<!-- {name}:begin -->\n```sh\n(.*?)```\n<!-- {name}:end -->", text, re.S)
    assert found, f"README.md has no {name} block"
    return found.group(1)


def run_as_written(script: str, db_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=REPO_ROOT,
        env={**os.environ, "DATABASE_URL": db_url},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_first_payment_from_the_readme_goes_through(conn: Conn, db_url: str) -> None:
    written = run_as_written(readme_block("first-payment"), db_url)
    assert written.returncode == 0, written.stderr
    drain(db_url)

    allocation = one(
        conn,
        "SELECT ta.status, ta.trainer_id::text AS trainer FROM trainer_allocations ta "
        "JOIN student_course_purchases pu ON pu.id = ta.purchase_id WHERE pu.payment_id = %s",
        PAYMENT,
    )
    assert allocation == {"status": "approved", "trainer": "70000000-0000-4000-8000-000000000001"}
    sessions = conn.execute(
        "SELECT scheduled_time::text AS at, extract(isodow FROM scheduled_date) AS dow "
        "FROM tutoring_sessions WHERE status = 'scheduled' ORDER BY session_number"
    ).fetchall()
    assert len(sessions) == 10
    assert {s["at"] for s in sessions} == {"17:00:00"}
    assert {int(s["dow"]) for s in sessions} <= {1, 2, 3, 4, 5}

    traced = run_as_written(f"make -s trace ID={PAYMENT}", db_url)
    assert traced.returncode == 0, traced.stderr
    assert re.search(r"allocation_status\s+approved", traced.stdout)
    assert re.search(r"sessions_written\s+10", traced.stdout)


def test_the_layout_table_names_every_module() -> None:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    layout = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"(\w+\.py)`", layout))
    modules = {path.name for path in (REPO_ROOT / "workers").rglob("*.py")}
    assert modules - named == set(), "README.md's Layout table misses these modules"
    assert named - modules == set(), "README.md's Layout table names modules that do not exist"


def test_the_commands_listed_are_the_clis() -> None:
    from workers.ops.cli import build_parser

    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"`python -m workers --help` \(([^)]*)\)", text)
    assert found, "README.md lists the commands after `python -m workers --help`"
    listed = re.findall(r"`([a-z-]+)`", found.group(1))
    [commands] = [
        action.choices
        for action in build_parser()._actions
        if isinstance(action.choices, dict) and "run" in action.choices
    ]
    assert listed == list(commands)

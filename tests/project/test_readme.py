"""README.md's "Your first payment" runs as written and ends with an approved allocation and
its sessions: a newcomer's first try is part of the suite. So does the refund of
docs/operating.md. The README stays a first day's read, and every link of it and of docs/
leads somewhere."""

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


def readme_block(name: str, page: str = "README.md") -> str:
    text = (REPO_ROOT / page).read_text(encoding="utf-8")
    found = re.search(rf"<!-- {name}:begin -->\n```sh\n(.*?)```\n<!-- {name}:end -->", text, re.S)
    assert found, f"{page} has no {name} block"
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
    assert traced.stdout.startswith("Asha Rao · Robotics with Arduino · purchase ")
    assert (
        "On track: Trainer Ravi Kumar teaches it: 10 sessions written, 10 ahead." in traced.stdout
    )
    assert re.search(
        r"approved, trainer Ravi Kumar 70000000-0000-4000-8000-000000000001\n"
        r"\s+10 sessions \(numbers 1\.\.10\): 0 completed, 10 ahead",
        traced.stdout,
    )
    assert "10 sessions written: numbers 1..10 of 10" in traced.stdout

    refunded = run_as_written(readme_block("refund", "docs/operating.md"), db_url)
    assert refunded.returncode == 0, refunded.stderr
    story = refunded.stdout
    assert "Closed: The purchase is no longer active (refunded)." in story
    assert f"{PAYMENT}  first payment: 10 sessions; refunded" in story
    assert "cancelled (refunded), trainer Ravi Kumar" in story


def test_the_layout_table_names_every_module() -> None:
    text = (REPO_ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    layout = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"(\w+\.py)`", layout))
    modules = {path.name for path in (REPO_ROOT / "workers").rglob("*.py")}
    assert modules - named == set(), "docs/architecture.md's Layout table misses these modules"
    assert named - modules == set(), "docs/architecture.md's Layout names modules that do not exist"


def test_the_commands_listed_are_the_clis() -> None:
    from workers.cli import build_parser

    text = (REPO_ROOT / "docs" / "operating.md").read_text(encoding="utf-8")
    found = re.search(r"`\.venv/bin/python -m workers --help` \(([^)]*)\)", text)
    assert found, "docs/operating.md lists the commands after `.venv/bin/python -m workers --help`"
    listed = re.findall(r"`([a-z-]+)`", found.group(1))
    [commands] = [
        action.choices
        for action in build_parser()._actions
        if isinstance(action.choices, dict) and "run" in action.choices
    ]
    assert listed == list(commands)


def test_the_readme_is_a_first_day_s_read() -> None:
    lines = (REPO_ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move the rest to docs/"
    text = "\n".join(lines)
    for command in ("make run-workers", "make test", "make trace", "make db-remove"):
        assert command in text
    # `python -m workers` outside the venv fails (no psycopg): the README names the venv's.
    assert "python -m workers --help" not in text.replace(".venv/bin/python -m workers", "")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_link_of_the_readme_and_the_docs_leads_somewhere() -> None:
    pages = [REPO_ROOT / "README.md", REPO_ROOT / "CONVENTIONS.md"]
    pages += sorted((REPO_ROOT / "docs").glob("*.md"))
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue  # http(s), mailto: not followed here
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.name}: link to {target}: no such file"
            if anchor and file.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), re.M)
                assert anchor in {slug(h) for h in headings}, (
                    f"{page.name}: link to {target}: no such heading in {file.name}"
                )

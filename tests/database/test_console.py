"""The operations console (issue 16) through Starlette's test client against a real database:
every page, every action, every refusal, and the database going away and coming back."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import DictRow

from tests import factories as f
from tests.console_world import (
    World,
    add_operator,
    build_world,
    console,
    csrf_of,
    page_text,
    post,
    sign_in,
)
from tests.helpers import drain, one, spawn_worker, wait_for
from workers.console import serve
from workers.console.charts import StagePoint, axis_top, stage_chart
from workers.database import migrate
from workers.database.connections import OPERATOR_ROLE, make_operator_pool
from workers.database.embedded import EmbeddedServer
from workers.errors import ConfigurationError

Conn = psycopg.Connection[DictRow]


@pytest.fixture
def world(conn: Conn, db_url: str) -> World:
    return build_world(conn, db_url)


def counts(conn: Conn) -> DictRow:
    """What an action would change: history, jobs, requests, allocations, sessions."""
    return one(
        conn,
        "SELECT (SELECT count(*) FROM stage_history) AS history, "
        "(SELECT count(*) FROM pgqueuer) AS jobs, "
        "(SELECT count(*) FROM allocation_requests) AS requests, "
        "(SELECT count(*) FROM schedule_changes) AS reschedules, "
        "(SELECT count(*) FROM trainer_allocations) AS allocations, "
        "(SELECT count(*) FROM tutoring_sessions) AS sessions",
    )


# -- the pages --------------------------------------------------------------------------------


def test_overview_shows_the_funnel_the_stages_and_the_chart(world: World, db_url: str) -> None:
    with console(db_url) as client:
        page = client.get("/")
    assert page.status_code == 200
    text = page_text(page.text)
    # Four payments entered the pipeline: two became purchases, one approved with its ten
    # sessions, one waiting; one failed in the purchase stage, one was rejected.
    # Each row of the funnel adds up to its whole.
    assert (
        "4 payments succeeded = 2 purchases made + 0 upgrades applied + 1 rejected "
        "+ 1 purchase job failed + 0 in the purchase stage"
    ) in text
    assert (
        "2 purchases = 1 trainer approved + 1 waiting for a trainer "
        "+ 0 closed (refunded or finished) + 0 in the allocation stage"
    ) in text
    assert "10 sessions written for 1 purchase." in text
    assert "purchase 0 0 1" in text  # queued, in flight, failed
    assert "<svg" in page.text and "Jobs done and p95 latency per stage" in page.text
    assert "polyline" in page.text or "<circle" in page.text  # jobs were done: a line or a dot
    assert "Waiting 1" in text and "Failures 2" in text  # the navigation's counts


def test_waiting_lists_each_purchase_by_reason_with_its_sentence(world: World, db_url: str) -> None:
    with console(db_url) as client:
        page = client.get("/waiting")
    text = page_text(page.text)
    assert page.status_code == 200
    assert "1 purchase(s) wait for a trainer" in text
    assert "no_free_slot · 1" in text
    assert "Meera Iyer" in text and "Robotics with Arduino" in text
    assert "21:00 weekdays from" in text and "Asia/Kolkata" in text
    assert "none is free on every session day at 21:00" in text
    assert f'href="/trace/{world.waiting_purchase}"' in page.text
    assert 'action="/actions/' not in page.text  # not signed in: nothing to press


def test_failures_show_the_error_the_traceback_and_the_rejection(world: World, db_url: str) -> None:
    with console(db_url) as client:
        page = client.get("/failures")
    text = page_text(page.text)
    assert page.status_code == 200
    assert "Failed jobs · 1" in text and "Dev Patel" in text
    assert "ScheduleError" in text and "Traceback (most recent call last)" in text
    assert "Rejected payments · 1" in text and "Kiran Das" in text
    assert "sessionCount" in text and "10, 20 or 30" in text


def test_search_finds_an_id_or_a_name(world: World, conn: Conn, db_url: str) -> None:
    student = one(conn, "SELECT student_id FROM payments WHERE id = %s", world.waiting)
    with console(db_url) as client:
        for ref in (world.waiting, world.waiting_purchase, student["student_id"]):
            found = client.get("/search", params={"q": f" {ref} "}, follow_redirects=False)
            assert (found.status_code, found.headers["location"]) == (303, f"/trace/{ref}")
        by_name = page_text(client.get("/search", params={"q": "meera"}).text)
        assert "Meera Iyer" in by_name and "Asha Rao" not in by_name
        # ILIKE's wildcards are taken literally: '%' matches no name.
        nothing = page_text(client.get("/search", params={"q": "%%"}).text)
        assert "No student's name contains “%%”" in nothing
        assert "at least two letters" in page_text(client.get("/search?q=m").text)


def test_a_waiting_purchase_s_trace_says_why_in_the_student_s_time_zone(
    world: World, conn: Conn, db_url: str
) -> None:
    # Asha's time zone is Asia/Kolkata; Meera now lives in New York.
    conn.execute(
        "UPDATE students SET timezone = 'America/New_York' WHERE id = "
        "(SELECT student_id FROM payments WHERE id = %s)",
        (world.waiting,),
    )
    with console(db_url) as client:
        page = client.get(f"/trace/{world.waiting_purchase}")
    text = page_text(page.text)
    assert page.status_code == 200
    assert "Meera Iyer · Robotics with Arduino" in text
    assert "Waiting: Waiting for a trainer (no_free_slot): 1 trainer(s) teach" in text
    assert "Times are in the student's time zone, America/New_York" in text
    # Every event of the timeline, in the student's zone (EST or EDT), by the pipeline.
    enqueued = one(
        conn,
        "SELECT at FROM stage_history WHERE ref_id = %s AND event = 'enqueued'",
        world.waiting,
    )["at"]
    shown = enqueued.astimezone(ZoneInfo("America/New_York")).strftime("%a %d %b %Y %H:%M:%S %Z")
    assert f"{shown} purchase enqueued" in text
    assert "allocation succeeded allocation" in text and "pending: no_free_slot" in text
    assert "pipeline" in text


def test_trace_of_a_bad_or_unknown_id_says_so(world: World, db_url: str) -> None:
    with console(db_url) as client:
        bad = client.get("/trace/not-an-id")
        unknown = client.get(f"/trace/{uuid.uuid4()}")
        missing = client.get("/no-such-page")
    assert bad.status_code == 400 and "'not-an-id' is not an id" in page_text(bad.text)
    assert unknown.status_code == 404
    assert "No payment, purchase, allocation or student has the id" in page_text(unknown.text)
    assert missing.status_code == 404


def test_the_console_reads_as_kc_operator(db_url: str) -> None:
    """The pool's connections act as kc_operator whatever the login (here a superuser)."""

    async def check() -> tuple[str, str, bool]:
        pool = make_operator_pool(db_url)
        await pool.open(wait=True)
        try:
            async with pool.connection() as conn:
                row = await (await conn.execute("SELECT current_user, session_user")).fetchone()
                assert row is not None
                try:
                    await conn.execute("DELETE FROM holidays")
                    refused = False
                except psycopg.errors.InsufficientPrivilege:
                    refused = True
                return row["current_user"], row["session_user"], refused
        finally:
            await pool.close()

    current, session, refused = asyncio.run(check())
    assert current == "kc_operator" and session != "kc_operator"
    assert refused


def test_pages_send_security_headers_and_refuse_other_hosts(db_url: str) -> None:
    with console(db_url) as client:
        page = client.get("/")
        elsewhere = client.get("/", headers={"host": "rebound.example"})
    assert "script-src" not in page.headers["content-security-policy"]  # no script allowed
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert elsewhere.status_code == 400


# -- refusals ---------------------------------------------------------------------------------


def test_a_console_without_operators_is_read_only(conn: Conn, db_url: str) -> None:
    """On loopback with no operator: every page reads, nobody may sign in or act."""
    world = build_world(conn, db_url, operators=())
    before = counts(conn)
    with console(db_url) as client:
        assert "Meera Iyer" in page_text(client.get(f"/trace/{world.waiting}").text)
        signin = page_text(client.get("/signin").text)
        assert "No operator may sign in yet, so this console is read-only" in signin
        assert "python -m workers operator add <name>" in signin
        status, text = post(
            client,
            "/actions/replay",
            {"stage": "purchase", "ref_id": str(world.failed)},
            page="/signin",
        )
        tried = post(client, "/signin", {"token": "x" * 43}, page="/signin")
    assert status == 403 and "Sign in with your operator token first" in text
    assert tried[0] == 403 and "That is not the token of an operator" in tried[1]
    assert counts(conn) == before


def test_actions_need_a_sign_in_and_a_csrf_token(world: World, conn: Conn, db_url: str) -> None:
    before = counts(conn)
    replay = {"stage": "purchase", "ref_id": str(world.failed)}
    with console(db_url) as client:
        status, text = post(client, "/actions/replay", replay, page="/signin")
        bad_token = post(client, "/signin", {"token": "not-the-token-at-all"}, page="/signin")
        sign_in(client, world.token())
        missing = client.post("/actions/replay", data=replay)
        wrong = client.post("/actions/replay", data={**replay, "csrf": "forged"})
    assert status == 403 and "Sign in with your operator token first" in text
    assert bad_token[0] == 403 and "That is not the token of an operator" in bad_token[1]
    for refused in (missing, wrong):
        assert refused.status_code == 403
        assert "CSRF token is missing or is not this browser session's" in page_text(refused.text)
    assert counts(conn) == before


def test_a_form_from_another_session_is_refused(world: World, conn: Conn, db_url: str) -> None:
    """A CSRF token is this session's: one copied from another signed-in session fails."""
    before = counts(conn)
    with console(db_url) as mallory, console(db_url) as priya:
        sign_in(mallory, world.token("Mallory"))
        sign_in(priya, world.token("Priya"))
        foreign = csrf_of(mallory.get("/").text)
        answer = priya.post(
            "/actions/replay",
            data={"stage": "purchase", "ref_id": str(world.failed), "csrf": foreign},
        )
    assert answer.status_code == 403
    assert counts(conn) == before


def test_bad_input_gets_a_clear_message_and_changes_nothing(
    world: World, conn: Conn, db_url: str
) -> None:
    before = counts(conn)
    nobody = str(uuid.uuid4())
    purchase = str(world.waiting_purchase)
    trainer = str(world.trainer)
    replay, assign, reschedule = "/actions/replay", "/actions/assign", "/actions/reschedule"
    cases = [
        (replay, {"stage": "purchase", "ref_id": "nope"}, 400, "'nope' is not a payment id"),
        (replay, {"stage": "billing", "ref_id": nobody}, 400, "'billing' is not a stage"),
        (replay, {"stage": "allocation", "ref_id": nobody}, 404, f"no allocation row {nobody}"),
        ("/actions/replay-failed", {"stage": ""}, 400, "'' is not a stage"),
        (assign, {"purchase_id": purchase, "trainer_id": "Ravi"}, 400, "'Ravi' is not a trainer"),
        (assign, {"purchase_id": purchase, "trainer_id": nobody}, 404, f"no trainer {nobody}"),
        (assign, {"purchase_id": nobody, "trainer_id": trainer}, 404, "no active purchase"),
        (
            assign,
            {"purchase_id": purchase, "trainer_id": trainer, "override": "on"},
            400,
            "an override needs a note saying why",
        ),
        (reschedule, {"purchase_id": purchase, "start_date": "soon"}, 400, "'soon' is not a date"),
        (reschedule, {"purchase_id": purchase, "time_slot": "25:00"}, 400, "the hour must be"),
        (reschedule, {"purchase_id": purchase}, 400, "nothing to change"),
        (reschedule, {"purchase_id": purchase, "mode": "fortnightly"}, 400, "is not one of"),
        (reschedule, {"purchase_id": purchase, "start_date": "2020-01-01"}, 400, "in the past"),
    ]
    with console(db_url) as client:
        sign_in(client, world.token())
        for path, data, status, message in cases:
            got, text = post(client, path, data)
            assert (got, message in text) == (status, True), (path, data, text)
            assert "nothing" in text.lower(), text
    assert counts(conn) == before


# -- actions ----------------------------------------------------------------------------------


def test_replay_a_failed_job_and_retry_a_waiting_purchase(
    world: World, conn: Conn, db_url: str
) -> None:
    with console(db_url) as client:
        sign_in(client, world.token("Priya"))
        failures = client.get("/failures")
        assert "Replay" in page_text(failures.text)  # signed in: the buttons are there
        status, text = post(
            client,
            "/actions/replay",
            {"stage": "purchase", "ref_id": str(world.failed), "back": "/failures"},
            page="/failures",
        )
        assert status == 303 and f"purchase {world.failed} enqueued again as job" in text
        status, text = post(
            client,
            "/actions/replay",
            {"stage": "allocation", "ref_id": str(world.waiting_purchase), "back": "/waiting"},
            page="/waiting",
        )
        assert status == 303 and "allocation" in text and "enqueued again" in text
        drain(db_url)
        after = page_text(client.get("/failures").text)
        trace = page_text(client.get(f"/trace/{world.failed}").text)
    assert "No job is held as failed." in after
    assert "On track: Trainer Ravi Kumar teaches it: 10 sessions written" in trace
    assert "purchase replayed" in trace and "console:Priya" in trace
    actors = conn.execute(
        "SELECT stage, ref_id, actor FROM stage_history WHERE event = 'replayed' ORDER BY id"
    ).fetchall()
    assert [(a["stage"], a["ref_id"], a["actor"]) for a in actors] == [
        ("purchase", world.failed, "console:Priya"),
        ("allocation", world.waiting_purchase, "console:Priya"),
    ]
    # What the pipeline wrote afterwards is the pipeline's, not Priya's.
    assert one(
        conn,
        "SELECT count(*) AS n FROM stage_history WHERE actor IS NOT NULL AND event <> 'replayed'",
    ) == {"n": 0}


def test_replay_every_failed_job_of_a_stage(world: World, conn: Conn, db_url: str) -> None:
    with console(db_url) as client:
        sign_in(client, world.token("Priya"))
        status, text = post(
            client, "/actions/replay-failed", {"stage": "purchase"}, page="/failures"
        )
    assert status == 303 and "1 failed purchase job(s) enqueued again." in text
    assert one(conn, "SELECT actor FROM stage_history WHERE event = 'replayed'") == {
        "actor": "console:Priya"
    }


@pytest.fixture
def worker(db_url: str, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real worker process, as `make run-workers` runs one."""
    process = spawn_worker(db_url, tmp_path / "worker.log", KC_LOG_LEVEL="INFO")
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


def test_assign_a_trainer_by_the_same_rules_then_with_an_override(
    world: World, conn: Conn, db_url: str, worker: subprocess.Popen[bytes]
) -> None:
    # Teaches painting only, but works evenings: the override may set aside the specialty.
    evening = f.trainer(conn, name="Nisha Rao", specialties=("Painting",), slot=("18:00", "23:00"))
    purchase = str(world.waiting_purchase)
    page = f"/trace/{purchase}"
    with console(db_url, outcome_wait=30) as client:
        sign_in(client, world.token("Priya"))
        trace = page_text(client.get(page).text)
        assert "Ravi Kumar · rating 4.70 · 1/8 students" in trace  # the choices offered
        status, refused = post(
            client,
            "/actions/assign",
            {"purchase_id": purchase, "trainer_id": str(evening), "back": page},
            page=page,
        )
        assert status == 303
        assert "Assignment request 1 refused: no_specialty" in refused
        assert "Waiting: Waiting for a trainer (no_free_slot)" in refused  # nothing changed
        status, done = post(
            client,
            "/actions/assign",
            {
                "purchase_id": purchase,
                "trainer_id": str(evening),
                "override": "on",
                "note": "parent asked for Nisha",
                "back": page,
            },
            page=page,
        )
    assert status == 303 and "Assignment request 2 done" in done
    assert "On track: Trainer Nisha Rao teaches it" in done or "Trainer Nisha Rao is chosen" in done
    assert "assign_requested request 2: trainer" in done and "console:Priya" in done
    requests = conn.execute(
        "SELECT id, status, requested_by FROM allocation_requests ORDER BY id"
    ).fetchall()
    assert [(r["status"], r["requested_by"]) for r in requests] == [
        ("refused", "console:Priya"),
        ("done", "console:Priya"),
    ]
    live = one(
        conn,
        "SELECT trainer_id, status FROM trainer_allocations WHERE purchase_id = %s "
        "AND status IN ('pending', 'approved')",
        world.waiting_purchase,
    )
    assert live == {"trainer_id": evening, "status": "approved"}


def test_reschedule_through_the_console(
    world: World, conn: Conn, db_url: str, worker: subprocess.Popen[bytes]
) -> None:
    purchase = one(
        conn, "SELECT id FROM student_course_purchases WHERE payment_id = %s", world.on_track
    )["id"]
    page = f"/trace/{world.on_track}"
    with console(db_url, outcome_wait=30) as client:
        sign_in(client, world.token("Arun"))
        status, text = post(
            client,
            "/actions/reschedule",
            {"purchase_id": str(purchase), "time_slot": "6:00 PM", "back": page},
            page=page,
        )
    assert status == 303 and "Reschedule request 1 done" in text, text
    assert "18:00 weekdays" in text
    assert "rescheduled request 1: weekdays at 17:00" in text and "console:Arun" in text
    change = one(conn, "SELECT status, requested_by FROM schedule_changes")
    assert change == {"status": "done", "requested_by": "console:Arun"}

    def slots() -> list[DictRow]:
        return conn.execute(
            "SELECT DISTINCT scheduled_time::text AS at FROM tutoring_sessions "
            "WHERE status = 'scheduled'"
        ).fetchall()

    # The sessions stage writes the new schedule after the request is done.
    wait_for(lambda: slots() == [{"at": "18:00:00"}], 30, "the sessions at 18:00")


def test_an_outcome_not_decided_yet_is_said_so(world: World, conn: Conn, db_url: str) -> None:
    """No worker runs: the request is recorded, and the page says it is not decided yet."""
    with console(db_url, outcome_wait=0.3) as client:
        sign_in(client, world.token())
        status, text = post(
            client,
            "/actions/assign",
            {"purchase_id": str(world.waiting_purchase), "trainer_id": str(world.trainer)},
        )
    assert status == 303
    assert "Assignment request 1 is recorded; the allocation stage has not decided it yet" in text
    assert one(conn, "SELECT status FROM allocation_requests") == {"status": "open"}


def test_signing_out_ends_the_right_to_act(world: World, conn: Conn, db_url: str) -> None:
    with console(db_url) as client:
        sign_in(client, world.token())
        status, text = post(client, "/signout", {})
        assert status == 303 and "Signed out." in text and "signed in as" not in text
        status, text = post(
            client,
            "/actions/replay",
            {"stage": "purchase", "ref_id": str(world.failed)},
            page="/signin",
        )
    assert status == 403 and "Sign in" in text
    assert one(conn, "SELECT count(*) AS n FROM stage_history WHERE event = 'replayed'") == {"n": 0}


# -- the database goes away -------------------------------------------------------------------


def test_a_terminated_connection_is_replaced_on_the_next_request(
    world: World, conn: Conn, db_url: str
) -> None:
    with console(db_url) as client:
        assert client.get("/").status_code == 200
        killed = one(
            conn,
            "SELECT count(pg_terminate_backend(pid)) AS n FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'koding-caravan-console'",
        )
        assert killed["n"] >= 1
        again = client.get(f"/trace/{world.waiting}")
    assert again.status_code == 200 and "Meera Iyer" in page_text(again.text)


def test_a_database_that_does_not_answer_gets_the_unavailable_page() -> None:
    nowhere = "postgresql://postgres@127.0.0.1:1/nothing"  # port 1: nothing listens there
    with console(nowhere, pool_timeout=1) as client:
        page = client.get("/")
    assert page.status_code == 503
    text = page_text(page.text)
    assert "Database unavailable" in text and "connects again by itself" in text
    assert '<meta http-equiv="refresh" content="5">' in page.text


def test_the_console_works_again_after_a_real_restart(tmp_path: Path) -> None:
    """A server of its own (the embedded one): up, stopped, started again."""
    server = EmbeddedServer(tmp_path / "pgdata")
    try:
        migrate.upgrade(server.ensure_running())
        # The console logs in as the operator's login (the embedded server's own roles).
        with console(server.login_url(OPERATOR_ROLE), pool_timeout=2) as client:
            assert client.get("/").status_code == 200
            server.stop()
            down = client.get("/")
            assert down.status_code == 503 and "Database unavailable" in page_text(down.text)
            server.ensure_running()
            wait_for(lambda: client.get("/").status_code == 200, 60, "the console to reconnect")
    finally:
        server.stop()
        if server.cluster_dir != server.root:
            shutil.rmtree(server.cluster_dir, ignore_errors=True)


def test_pages_answer_while_a_worker_runs(
    conn: Conn, db_url: str, worker: subprocess.Popen[bytes]
) -> None:
    course = f.course(conn)
    f.trainer(conn)
    payments = [  # one trainer, six students at six different hours
        f.payment(
            conn,
            f.student(conn, name=f"Student {i}"),
            course,
            {"sessionCount": 10, "timeSlot": f"{8 + i}:00"},
        )
        for i in range(6)
    ]
    with console(db_url) as client:
        for _ in range(3):
            for path in ("/", "/waiting", "/failures", f"/trace/{payments[0]}"):
                assert client.get(path).status_code == 200
        wait_for(
            lambda: one(conn, "SELECT count(*) AS n FROM tutoring_sessions")["n"] == 60,
            60,
            "the six payments' sessions",
        )
        trace = page_text(client.get(f"/trace/{payments[-1]}").text)
    assert "On track" in trace and "10 sessions written" in trace


# -- serving ----------------------------------------------------------------------------------


def console_command(db_url: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m workers console ...` (it stops at a check before listening, or at port 1)."""
    environment = {k: v for k, v in os.environ.items() if k != "KC_CONSOLE_TOKEN"}
    environment.update(DATABASE_URL=db_url, **env)
    return subprocess.run(
        [sys.executable, "-m", "workers", "console", *args],
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_listening_beyond_loopback_needs_an_operator(conn: Conn, db_url: str) -> None:
    refused = console_command(db_url, "--host", "0.0.0.0", "--port", "1")
    assert refused.returncode == 2
    assert "refusing to listen on 0.0.0.0: beyond loopback every page needs sign-in" in (
        refused.stderr
    )
    assert "python -m workers operator add <name>" in refused.stderr
    assert serve.is_loopback("127.0.0.1") and serve.is_loopback("::1")
    assert serve.is_loopback("localhost") and serve.is_loopback("127.1.2.3")
    assert not serve.is_loopback("0.0.0.0") and not serve.is_loopback("console.example")
    serve.check_address("127.0.0.1", 0)  # loopback: reading needs no operator
    serve.check_address("0.0.0.0", 1)  # an operator may sign in: allowed
    serve.check_address("0.0.0.0", None)  # the database does not answer yet: it starts
    add_operator(conn, "Priya")
    assert serve.check_database(db_url) == 1


def test_the_shared_token_is_refused_with_what_replaced_it(db_url: str) -> None:
    """KC_CONSOLE_TOKEN set: the console does not start, and says what to do instead."""
    old = console_command(db_url, "--port", "1", KC_CONSOLE_TOKEN="a-shared-token-0123456789")
    assert old.returncode == 2
    assert "KC_CONSOLE_TOKEN is no longer used" in old.stderr
    assert "python -m workers operator add <name>" in old.stderr
    assert "a-shared-token" not in old.stderr + old.stdout


def test_a_login_that_may_not_act_as_kc_operator_is_refused(db_url: str, admin_url: str) -> None:
    name = f"kc_test_nobody_{uuid.uuid4().hex[:8]}"
    database = conninfo_to_dict(db_url)["dbname"]
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {name} LOGIN")
    try:
        # It may connect (only the project's roles may by default: docs/security.md).
        with psycopg.connect(db_url, autocommit=True) as owner:
            owner.execute(f'GRANT CONNECT ON DATABASE "{database}" TO {name}')
        url = db_url.replace("postgres@", f"{name}@", 1)
        with pytest.raises(ConfigurationError, match=f"GRANT kc_operator TO {name}"):
            serve.check_database(url)
    finally:
        with psycopg.connect(db_url, autocommit=True) as owner:
            owner.execute(f'REVOKE CONNECT ON DATABASE "{database}" FROM {name}')
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"DROP ROLE IF EXISTS {name}")


def test_a_login_without_connect_is_refused_not_waited_for(db_url: str, admin_url: str) -> None:
    """The database answers and says no: waiting would never help (it used to start anyway)."""
    name = f"kc_test_nocon_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {name} LOGIN")  # no project role: no CONNECT
    try:
        url = db_url.replace("postgres@", f"{name}@", 1)
        with pytest.raises(ConfigurationError, match="may not connect to this database"):
            serve.check_database(url)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"DROP ROLE IF EXISTS {name}")


def test_a_database_behind_on_migrations_is_refused(conn: Conn, db_url: str) -> None:
    conn.execute("UPDATE alembic_version SET version_num = '0011'")
    with pytest.raises(ConfigurationError, match="make migrate"):
        serve.check_database(db_url)


def test_console_help_names_host_port_and_operators() -> None:
    helped = subprocess.run(
        [sys.executable, "-m", "workers", "console", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for word in ("--host", "--port", "operator add", "127.0.0.1", "8080", "kc_operator"):
        assert word in helped.stdout


# -- the chart --------------------------------------------------------------------------------


def test_the_chart_draws_each_stage_and_says_when_nothing_ran() -> None:
    now = datetime(2026, 11, 22, 12, 10, tzinfo=UTC)
    bucket = timedelta(minutes=30)
    points = [
        StagePoint("purchase", datetime(2026, 11, 22, 11, 0, tzinfo=UTC), 12, 40.0, 95.0),
        StagePoint("purchase", datetime(2026, 11, 22, 11, 30, tzinfo=UTC), 7, 35.0, 80.0),
        StagePoint("sessions", datetime(2026, 11, 22, 12, 0, tzinfo=UTC), 3, 20.0, 25.0),
    ]
    svg = str(stage_chart(points, now, timedelta(hours=12), bucket))
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    # Jobs done: a line per stage (a bucket without jobs is 0). Latency: purchase's two
    # buckets are a line, sessions' one bucket a dot, allocation has none.
    assert svg.count("<polyline") == 4
    assert svg.count("<circle") == 1
    assert "Jobs done: purchase 19, allocation 0, sessions 3." in svg
    assert ">100 ms<" in svg and ">20<" in svg  # round axis tops: 100 ms, 20 jobs
    empty = str(stage_chart([], now, timedelta(hours=12), bucket))
    assert empty.count("no job finished in this period") == 2
    assert [axis_top(v) for v in (0, 3, 37, 1089)] == [4, 4, 40, 2000]

"""A trainer's leave and substitutes for single sessions (issue 24, part B; migration 0019):
through the real functions, triggers and workers."""

from __future__ import annotations

import threading
import uuid
from datetime import date, time, timedelta
from typing import Any
from uuid import UUID

import psycopg
import pytest
from psycopg.rows import DictRow, dict_row

from tests import factories as f
from tests.helpers import allocation_of, drain, move_into_past, one
from tests.invariants import violations

Conn = psycopg.Connection[DictRow]


def monday_ahead(days: int = 14) -> date:
    start = date.today() + timedelta(days=days)
    return start + timedelta(days=(8 - start.isoweekday()) % 7)


def buy(conn: Conn, db_url: str, student: UUID, course: UUID, **metadata: Any) -> None:
    f.payment(conn, student, course, {"sessionCount": 10, **metadata})
    drain(db_url)


def request(conn: Conn, trainer: UUID, first: date, last: date, reason: str = "family") -> int:
    row = one(conn, "SELECT request_leave(%s, %s, %s, %s) AS id", trainer, first, last, reason)
    return int(row["id"])


def approve(conn: Conn, leave: int, handover_days: int = 14) -> list[DictRow]:
    return conn.execute("SELECT * FROM approve_leave(%s, %s)", (leave, handover_days)).fetchall()


def in_days(conn: Conn, trainer: UUID, first: date, last: date) -> list[DictRow]:
    """The trainer's scheduled sessions in those days."""
    return conn.execute(
        "SELECT * FROM tutoring_sessions WHERE trainer_id = %s AND status = 'scheduled' "
        "AND scheduled_date BETWEEN %s AND %s ORDER BY starts_at",
        (trainer, first, last),
    ).fetchall()


def snapshot(conn: Conn) -> list[tuple[Any, ...]]:
    """Everything a refusal must leave as it was."""
    rows = conn.execute(
        "SELECT id, trainer_id, status, original_trainer_id, substitution_leave_id "
        "FROM tutoring_sessions ORDER BY id"
    ).fetchall()
    leaves = conn.execute("SELECT * FROM trainer_leaves ORDER BY id").fetchall()
    history = one(conn, "SELECT count(*) AS n FROM stage_history")["n"]
    jobs = one(conn, "SELECT count(*) AS n FROM pgqueuer")["n"]
    return [tuple(r.values()) for r in rows + leaves] + [(history, jobs)]


@pytest.fixture
def week(conn: Conn, db_url: str) -> dict[str, Any]:
    """Trainer Ravi teaches five students from a Monday two weeks ahead: daily at 9:00 and
    12:30, weekdays at 10:00 and 15:00, Sundays at 11:00 (80 minutes). Then two more
    trainers arrive: Sita, free Monday to Saturday 8:00-14:00, and Uma, free Sundays
    11:00-13:00. Nobody but Ravi is free at 15:00."""
    course = f.course(conn)
    ravi = f.trainer(conn, name="Ravi")
    start = monday_ahead()
    plans = [
        ("daily", "9:00"),
        ("weekdays", "10:00"),
        ("sunday_only", "11:00"),
        ("daily", "12:30"),
        ("weekdays", "15:00"),
    ]
    students = []
    for i, (mode, slot) in enumerate(plans):
        student = f.student(conn, name=f"s{i}")
        buy(
            conn,
            db_url,
            student,
            course,
            scheduleMode=mode,
            timeSlot=slot,
            startDate=start.isoformat(),
        )
        alloc = allocation_of(conn, student)
        assert alloc["trainer_id"] == ravi, (mode, slot, alloc["reason"], alloc["reason_detail"])
        students.append(student)
    sita = f.trainer(conn, name="Sita", weekdays=range(1, 7), slot=("08:00", "14:00"))
    uma = f.trainer(conn, name="Uma", weekdays=[7], slot=("11:00", "13:00"))
    drain(db_url)  # new trainers retry nothing: nobody waits
    return {
        "course": course,
        "ravi": ravi,
        "sita": sita,
        "uma": uma,
        "students": students,
        # Tuesday to Monday: every course has sessions in it, and a Sunday.
        "first": start + timedelta(days=1),
        "last": start + timedelta(days=7),
    }


def test_a_week_of_leave_substitutes_where_someone_fits_and_makes_up_the_rest(
    conn: Conn, db_url: str, week: dict[str, Any]
) -> None:
    ravi, sita, uma = week["ravi"], week["sita"], week["uma"]
    first, last = week["first"], week["last"]
    ahead = in_days(conn, ravi, first, last)
    assert len(ahead) == 7 + 5 + 1 + 7 + 5
    leave = request(conn, ravi, first, last)
    # Requested is not approved: nothing moves yet.
    assert len(in_days(conn, ravi, first, last)) == len(ahead)

    changes = approve(conn, leave)
    assert len(changes) == len(ahead)
    by_slot: dict[tuple[bool, time], set[str]] = {}
    for c in changes:
        sunday = c["scheduled_date"].isoweekday() == 7
        by_slot.setdefault((sunday, c["scheduled_time"]), set()).add(
            f"{c['outcome']}:{c['trainer_id']}"
        )
    assert by_slot == {
        (False, time(9)): {f"substituted:{sita}"},
        (False, time(10)): {f"substituted:{sita}"},
        (False, time(12, 30)): {f"substituted:{sita}"},
        (False, time(15)): {f"cancelled:{ravi}"},  # nobody else at 15:00
        (True, time(9)): {f"cancelled:{ravi}"},  # Sita does not work Sundays, Uma from 11
        (True, time(11)): {f"substituted:{uma}"},
        (True, time(12, 30)): {f"cancelled:{ravi}"},  # Uma's Sunday ends at 13:00
    }

    # Done when: no session of Ravi's in those days, each with a substitute who fits every
    # rule for that one session, or cancelled with its reason.
    assert in_days(conn, ravi, first, last) == []
    moved = conn.execute(
        "SELECT ts.*, kc_session_fit(ts.id, ts.trainer_id, ts.scheduled_date, "
        "ts.scheduled_time, true) AS unfit FROM tutoring_sessions ts "
        "WHERE substitution_leave_id = %s",
        (leave,),
    ).fetchall()
    assert len(moved) == len(ahead)
    for s in moved:
        if s["status"] == "scheduled":
            assert s["original_trainer_id"] == ravi and s["trainer_id"] in (sita, uma)
            assert s["unfit"] is None and s["substituted_at"] is not None
        else:
            assert s["status"] == "cancelled" and s["trainer_id"] == ravi
            assert "nobody can take it during" in s["cancel_reason"]
    # The courses stay Ravi's: a substitute takes no place among their live allocations, and
    # sessions a substitute teaches do not make Ravi's allocations unfit (migration 0018).
    assert one(conn, "SELECT count(*) AS n FROM unfit_allocations")["n"] == 0
    for student in week["students"]:
        assert allocation_of(conn, student)["trainer_id"] == ravi
    # The app's old table, by its names.
    assert (
        one(
            conn,
            "SELECT count(*) AS n FROM trainer_session_substitutions WHERE leave_id = %s",
            leave,
        )["n"]
        == 6 + 5 + 1 + 6
    )

    # Make-ups: every cancelled session is made up after the last one, with Ravi.
    drain(db_url)
    for student in week["students"]:
        alloc = allocation_of(conn, student)
        counts = one(
            conn,
            "SELECT count(*) FILTER (WHERE status <> 'cancelled') AS standing, "
            "count(*) FILTER (WHERE status = 'cancelled') AS cancelled, "
            "count(*) FILTER (WHERE status = 'scheduled' AND trainer_id = %s) AS ravis "
            "FROM tutoring_sessions WHERE student_id = %s",
            ravi,
            student,
        )
        assert counts["standing"] == 10, (student, counts)
        assert alloc["trainer_id"] == ravi
    assert in_days(conn, ravi, first, last) == []
    history = conn.execute(
        "SELECT event, detail, actor FROM stage_history WHERE event IN ('substituted', 'leave') "
        "ORDER BY id"
    ).fetchall()
    assert len(history) == len(ahead)
    assert {h["actor"] for h in history} == {conn.info.user}
    assert violations(conn) == {}


def test_a_leave_cancelled_halfway_gives_the_sessions_ahead_back(
    conn: Conn, db_url: str, week: dict[str, Any]
) -> None:
    ravi, sita = week["ravi"], week["sita"]
    first, last = week["first"], week["last"]
    leave = request(conn, ravi, first, last)
    approve(conn, leave)
    drain(db_url)  # the make-ups of the sessions nobody could take
    # Halfway: the leave's first three days have passed (their sessions were taught).
    half = first + timedelta(days=3)
    move_into_past(conn, 30, "scheduled_date < %s", half)
    past = conn.execute(
        "SELECT id, trainer_id FROM tutoring_sessions WHERE substitution_leave_id = %s "
        "AND status = 'scheduled' AND starts_at < now()",
        (leave,),
    ).fetchall()
    assert past and all(p["trainer_id"] != ravi for p in past)
    ahead = conn.execute(
        "SELECT * FROM tutoring_sessions WHERE substitution_leave_id = %s "
        "AND status = 'scheduled' AND starts_at > now() ORDER BY starts_at",
        (leave,),
    ).fetchall()
    assert ahead

    changes = conn.execute("SELECT * FROM cancel_leave(%s)", (leave,)).fetchall()
    assert {c["session_id"] for c in changes} == {a["id"] for a in ahead}
    assert {c["outcome"] for c in changes} == {"given_back"}
    back = conn.execute(
        "SELECT trainer_id, original_trainer_id, substitution_leave_id FROM tutoring_sessions "
        "WHERE id = ANY(%s)",
        ([a["id"] for a in ahead],),
    ).fetchall()
    assert {tuple(b.values()) for b in back} == {(ravi, None, None)}
    # The past stays as it was taught.
    for p in past:
        assert (
            one(conn, "SELECT trainer_id FROM tutoring_sessions WHERE id = %s", p["id"])[
                "trainer_id"
            ]
            == p["trainer_id"]
        )
    row = one(conn, "SELECT status, cancelled_by, outcome FROM trainer_leaves WHERE id = %s", leave)
    assert row["status"] == "cancelled" and row["cancelled_by"] == conn.info.user
    assert row["outcome"].startswith(f"cancelled: {len(ahead)} given back, 0 kept")
    assert one(conn, "SELECT count(*) AS n FROM stage_history WHERE event = 'substitute_ended'")[
        "n"
    ] == len(ahead)
    assert sita  # Sita keeps what she taught
    assert violations(conn) == {}


def test_a_session_stays_with_its_substitute_when_the_trainer_is_busy_then(
    conn: Conn, db_url: str, week: dict[str, Any]
) -> None:
    ravi, sita = week["ravi"], week["sita"]
    first, last = week["first"], week["last"]
    leave = request(conn, ravi, first, last)
    approve(conn, leave)
    taken = one(
        conn,
        "SELECT * FROM tutoring_sessions WHERE substitution_leave_id = %s AND trainer_id = %s "
        "AND status = 'scheduled' ORDER BY starts_at LIMIT 1",
        leave,
        sita,
    )
    # Meanwhile Ravi's availability that weekday ends before that session's slot.
    conn.execute(
        "UPDATE trainer_availability SET slot_end = %s WHERE trainer_id = %s AND weekday = %s",
        (time(8, 30), ravi, taken["scheduled_date"].isoweekday()),
    )
    changes = {
        c["session_id"]: c
        for c in conn.execute("SELECT * FROM cancel_leave(%s)", (leave,)).fetchall()
    }
    kept = changes[taken["id"]]
    assert kept["outcome"] == "kept" and kept["trainer_id"] == sita
    assert "no_free_slot" in kept["detail"]
    assert (
        one(conn, "SELECT trainer_id FROM tutoring_sessions WHERE id = %s", taken["id"])[
            "trainer_id"
        ]
        == sita
    )


def test_a_leave_longer_than_the_bound_hands_the_courses_over(conn: Conn, db_url: str) -> None:
    course = f.course(conn)
    ravi = f.trainer(conn, name="Ravi")
    start = monday_ahead()
    students = [f.student(conn, name=f"s{i}") for i in range(2)]
    for student, slot in zip(students, ("9:00", "16:00"), strict=True):
        buy(
            conn,
            db_url,
            student,
            course,
            scheduleMode="daily",
            timeSlot=slot,
            startDate=start.isoformat(),
            sessionCount=20,
        )
    mala = f.trainer(conn, name="Mala", rating=4.0)
    drain(db_url)
    first, last = start + timedelta(days=2), start + timedelta(days=16)  # 15 days
    leave = request(conn, ravi, first, last, "surgery")
    changes = approve(conn, leave, handover_days=14)
    assert {c["outcome"] for c in changes} == {"handed_over"}
    leave_row = one(conn, "SELECT handed_over, outcome FROM trainer_leaves WHERE id = %s", leave)
    assert leave_row["handed_over"] and "handed over" in leave_row["outcome"]
    assert one(conn, "SELECT count(*) AS n FROM unfit_allocations WHERE why = 'on_leave'")["n"] == 2
    drain(db_url)
    for student in students:
        live = allocation_of(conn, student)
        assert live["trainer_id"] == mala and live["status"] == "approved"
        ended = one(
            conn,
            "SELECT reason, reason_detail FROM trainer_allocations WHERE student_id = %s "
            "AND trainer_id = %s",
            student,
            ravi,
        )
        assert ended["reason"] == "trainer_left" and "on leave" in ended["reason_detail"]
    assert in_days(conn, ravi, first, last) == []
    assert violations(conn) == {}


def test_an_operator_substitute_named_is_checked_and_best_is_chosen(
    conn: Conn, db_url: str, week: dict[str, Any]
) -> None:
    ravi, sita, uma = week["ravi"], week["sita"], week["uma"]
    session = one(
        conn,
        "SELECT * FROM tutoring_sessions WHERE trainer_id = %s AND scheduled_time = '15:00' "
        "ORDER BY starts_at LIMIT 1",
        ravi,
    )
    before = snapshot(conn)
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as refused:
        conn.execute("SELECT substitute_session(%s, %s)", (session["id"], sita))
    assert "cannot take session" in str(refused.value)
    assert "no_free_slot: trainer Sita is not available" in str(refused.value)
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState) as nobody:
        conn.execute("SELECT substitute_session(%s)", (session["id"],))
    assert "nobody can take session" in str(nobody.value)
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        conn.execute("SELECT substitute_session(%s, %s)", (session["id"], ravi))
    with pytest.raises(psycopg.errors.NoDataFound):
        conn.execute("SELECT substitute_session(%s)", (uma,))
    assert snapshot(conn) == before

    morning = one(
        conn,
        "SELECT * FROM tutoring_sessions WHERE trainer_id = %s AND scheduled_time = '10:00' "
        "ORDER BY starts_at LIMIT 1",
        ravi,
    )
    seq = one(conn, "SELECT coalesce(max(seq), 0) AS n FROM business_events")["n"]
    assert one(conn, "SELECT substitute_session(%s, %s) AS t", morning["id"], sita)["t"] == sita
    # The app hears it: SESSION_SUBSTITUTED, and the student and both trainers are told.
    told = conn.execute(
        "SELECT payload FROM business_events WHERE seq > %s ORDER BY seq", (seq,)
    ).fetchall()
    kinds = [
        (t["payload"]["type"], t["payload"].get("title"), t["payload"]["userId"]) for t in told
    ]
    student = str(morning["student_id"])
    assert kinds == [
        ("SESSION_SUBSTITUTED", None, student),
        ("NOTIFICATION_REQUESTED", "Trainer Substituted", student),
        ("NOTIFICATION_REQUESTED", "Session Reassigned", str(ravi)),
        ("NOTIFICATION_REQUESTED", "Session Assigned", str(sita)),
    ]
    event = told[0]["payload"]
    assert (event["sessionId"], event["originalTrainerId"], event["substituteTrainerId"]) == (
        str(morning["id"]),
        str(ravi),
        str(sita),
    )
    assert told[3]["payload"]["body"].startswith('You will teach "Robotics')
    row = one(conn, "SELECT * FROM tutoring_sessions WHERE id = %s", morning["id"])
    assert (row["trainer_id"], row["original_trainer_id"], row["substitution_leave_id"]) == (
        sita,
        ravi,
        None,
    )
    # Back to Ravi by name: he is the session's own trainer again, nothing beside it.
    assert one(conn, "SELECT substitute_session(%s, %s) AS t", morning["id"], ravi)["t"] == ravi
    row = one(conn, "SELECT * FROM tutoring_sessions WHERE id = %s", morning["id"])
    assert (row["trainer_id"], row["original_trainer_id"]) == (ravi, None)
    # The best: Sita is the only one free at 9:00 on a weekday.
    nine = one(
        conn,
        "SELECT * FROM tutoring_sessions WHERE trainer_id = %s AND scheduled_time = '09:00' "
        "AND extract(isodow FROM scheduled_date) < 6 ORDER BY starts_at LIMIT 1",
        ravi,
    )
    assert one(conn, "SELECT substitute_session(%s) AS t", nine["id"])["t"] == sita
    lines = conn.execute(
        "SELECT detail FROM stage_history WHERE event = 'substituted' ORDER BY id"
    ).fetchall()
    assert len(lines) == 3 and "an operator's substitute" in lines[0]["detail"]


def test_leave_requests_are_checked_and_change_nothing_when_refused(
    conn: Conn, db_url: str, week: dict[str, Any]
) -> None:
    ravi, first, last = week["ravi"], week["first"], week["last"]
    leave = request(conn, ravi, first, last)
    before = snapshot(conn)
    bad: list[tuple[type[Exception], tuple[Any, ...], str]] = [
        (psycopg.errors.NoDataFound, (week["students"][0], first, last, "x"), "no trainer"),
        (psycopg.errors.InvalidParameterValue, (ravi, last, first, "x"), "before the first"),
        (
            psycopg.errors.InvalidParameterValue,
            (ravi, date.today() - timedelta(days=9), date.today() - timedelta(days=3), "x"),
            "is over",
        ),
        (
            psycopg.errors.InvalidParameterValue,
            (ravi, last + timedelta(days=1), last + timedelta(days=1), "  "),
            "reason",
        ),
        (
            psycopg.errors.ExclusionViolation,
            (ravi, last, last + timedelta(days=2), "x"),
            f"already has leave {leave}",
        ),
    ]
    for error, args, message in bad:
        with pytest.raises(error) as refused:
            conn.execute("SELECT request_leave(%s, %s, %s, %s)", args)
        assert message in str(refused.value)
    # The table's own constraint, for a writer that skips the function.
    with pytest.raises(psycopg.errors.ExclusionViolation):
        conn.execute(
            "INSERT INTO trainer_leaves (trainer_id, first_day, last_day, reason, requested_by)"
            " VALUES (%s, %s, %s, 'x', 'me')",
            (ravi, first, first),
        )
    assert snapshot(conn) == before

    approve(conn, leave)
    before = snapshot(conn)
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="approved already"):
        approve(conn, leave)
    with pytest.raises(psycopg.errors.NoDataFound):
        approve(conn, leave + 100)
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        approve(conn, leave, handover_days=0)
    assert snapshot(conn) == before
    # A trainer on leave is no substitute those days.
    sita_session = one(
        conn,
        "SELECT * FROM tutoring_sessions WHERE substitution_leave_id = %s "
        "AND status = 'scheduled' LIMIT 1",
        leave,
    )
    fit = one(
        conn,
        "SELECT kc_session_fit(%s, %s, %s, %s, false) AS why",
        sita_session["id"],
        ravi,
        sita_session["scheduled_date"],
        sita_session["scheduled_time"],
    )["why"]
    assert fit.startswith("on_leave: trainer Ravi is on leave")
    # A request cancelled before approval changes nothing else.
    other = request(conn, ravi, last + timedelta(days=3), last + timedelta(days=4))
    assert conn.execute("SELECT * FROM cancel_leave(%s)", (other,)).fetchall() == []
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState, match="cancelled already"):
        conn.execute("SELECT * FROM cancel_leave(%s)", (other,))


def test_concurrent_substitutions_never_double_book(conn: Conn, db_url: str) -> None:
    """Eight sessions at the same hour (eight trainers' students, 55 km apart, each trainer
    reaching only their own student) and one free substitute who reaches them all: eight
    operators ask for the best substitute at once; exactly one gets her."""
    course = f.course(conn)
    start = monday_ahead()
    sessions = []
    for i in range(8):
        lat = f.HOME[0] + 0.5 * i
        trainer = f.trainer(conn, name=f"T{i}", lat=lat + 0.01, lng=f.HOME[1])
        student = f.student(conn, name=f"s{i}", lat=lat)
        f.payment(
            conn,
            student,
            course,
            {
                "sessionCount": 10,
                "scheduleMode": "daily",
                "timeSlot": "10:00",
                "startDate": start.isoformat(),
            },
        )
        drain(db_url)
        assert allocation_of(conn, student)["trainer_id"] == trainer
        sessions.append(
            one(
                conn,
                "SELECT id FROM tutoring_sessions WHERE student_id = %s AND scheduled_date = %s",
                student,
                start,
            )["id"]
        )
    sub = f.trainer(conn, name="Sub", slot=("09:00", "12:00"), radius_km=1000)
    barrier = threading.Barrier(len(sessions))
    results: list[str] = []

    def ask(session: UUID) -> None:
        with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as mine:
            barrier.wait()
            try:
                row = one(mine, "SELECT substitute_session(%s) AS t", session)
                results.append(str(row["t"]))
            except psycopg.errors.ObjectNotInPrerequisiteState as exc:
                results.append(f"refused: {exc}")

    threads = [threading.Thread(target=ask, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results.count(str(sub)) == 1, results
    assert all(
        r.startswith("refused: nobody can take session") for r in results if r != str(sub)
    ), results
    assert (
        one(conn, "SELECT count(*) AS n FROM tutoring_sessions WHERE trainer_id = %s", sub)["n"]
        == 1
    )
    assert violations(conn) == {}


def test_the_app_may_ask_for_leave_but_only_an_operator_approves(
    conn: Conn, db_url: str, admin_url: str, week: dict[str, Any]
) -> None:
    from tests.database.test_security_roles import as_user, refused

    name = f"kc_test_app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {name} LOGIN IN ROLE kc_app")
    try:
        app = as_user(db_url, name)
        with psycopg.connect(app, autocommit=True, row_factory=dict_row) as a:
            leave = one(
                a,
                "SELECT request_leave(%s, %s, %s, 'exam duty') AS id",
                week["ravi"],
                week["first"],
                week["first"],
            )["id"]
            assert (
                one(a, "SELECT requested_by FROM trainer_leaves WHERE id = %s", leave)[
                    "requested_by"
                ]
                == name
            )
        before = snapshot(conn)
        assert refused(app, "SELECT * FROM approve_leave(%s)", leave)
        assert refused(app, "SELECT * FROM cancel_leave(%s)", leave)
        session = one(conn, "SELECT id FROM tutoring_sessions LIMIT 1")["id"]
        assert refused(app, "SELECT substitute_session(%s)", session)
        assert refused(app, "UPDATE trainer_leaves SET status = 'approved' WHERE id = %s", leave)
        assert refused(app, "SELECT * FROM kc_approve_leave(%s, 14, 'me')", leave)
        assert snapshot(conn) == before
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {name}")
            admin.execute(f"DROP ROLE {name}")


def test_any_change_of_trainer_is_recorded_beside_the_session(
    conn: Conn, db_url: str, week: dict[str, Any]
) -> None:
    """A move's substitute (migration 0018) writes trainer_id alone: the original trainer is
    recorded all the same, and a session back with its trainer has nothing beside it."""
    ravi, sita = week["ravi"], week["sita"]
    session = one(
        conn,
        "SELECT id FROM tutoring_sessions WHERE trainer_id = %s AND "
        "scheduled_time = '10:00' ORDER BY starts_at LIMIT 1",
        ravi,
    )["id"]
    conn.execute("UPDATE tutoring_sessions SET trainer_id = %s WHERE id = %s", (sita, session))
    row = one(conn, "SELECT * FROM tutoring_sessions WHERE id = %s", session)
    assert (row["original_trainer_id"], row["substituted_at"] is not None) == (ravi, True)
    conn.execute("UPDATE tutoring_sessions SET trainer_id = %s WHERE id = %s", (ravi, session))
    row = one(conn, "SELECT * FROM tutoring_sessions WHERE id = %s", session)
    assert (row["original_trainer_id"], row["substituted_at"]) == (None, None)


def test_the_console_records_approves_cancels_and_substitutes(
    conn: Conn, db_url: str, week: dict[str, Any]
) -> None:
    from tests.console_world import add_operator, console, page_text, post, sign_in

    ravi, sita = week["ravi"], week["sita"]
    first, last = week["first"], week["last"]
    token = add_operator(conn, "Arun")
    before = snapshot(conn)
    with console(db_url) as client:
        sign_in(client, token)
        bad = [
            (
                {
                    "trainer_id": "Ravi",
                    "first_day": str(first),
                    "last_day": str(last),
                    "reason": "x",
                },
                400,
                "'Ravi' is not a trainer id",
            ),
            (
                {
                    "trainer_id": str(ravi),
                    "first_day": str(last),
                    "last_day": str(first),
                    "reason": "x",
                },
                400,
                "is before the first day",
            ),
            (
                {"trainer_id": str(ravi), "first_day": str(first), "last_day": str(last)},
                400,
                "a leave needs a reason",
            ),
        ]
        for data, status, message in bad:
            got, text = post(client, "/actions/leave-request", data, page="/leaves")
            assert (got, message in text) == (status, True), text
        got, text = post(client, "/actions/leave-approve", {"leave_id": "x"}, page="/leaves")
        assert got == 400 and "not a leave number" in text
        assert snapshot(conn) == before

        got, text = post(
            client,
            "/actions/leave-request",
            {
                "trainer_id": str(ravi),
                "first_day": str(first),
                "last_day": str(last),
                "reason": "family wedding",
                "approve": "on",
                "back": "/leaves",
            },
            page="/leaves",
        )
        assert got == 303, text
        assert "approved: 18 session(s) with a substitute, 7 cancelled" in text, text
        assert "family wedding" in text and "approved by console:Arun" in text
        leave = one(conn, "SELECT * FROM trainer_leaves")
        assert (leave["requested_by"], leave["approved_by"]) == ("console:Arun", "console:Arun")
        again, text = post(
            client,
            "/actions/leave-request",
            {"trainer_id": str(ravi), "first_day": str(last), "last_day": str(last), "reason": "x"},
            page="/leaves",
        )
        assert again == 409 and f"already has leave {leave['id']}" in text

        # One session, named: refused with the rule's sentence, changing nothing.
        late = one(
            conn,
            "SELECT id FROM tutoring_sessions WHERE trainer_id = %s AND "
            "scheduled_time = '15:00' AND status = 'scheduled' ORDER BY starts_at LIMIT 1",
            ravi,
        )["id"]
        before = snapshot(conn)
        got, text = post(
            client,
            "/actions/substitute",
            {"session_id": str(late), "trainer_id": str(sita)},
            page="/leaves",
        )
        assert got == 409 and "no_free_slot: trainer Sita is not available" in text, text
        assert snapshot(conn) == before
        nine = one(
            conn,
            "SELECT id FROM tutoring_sessions WHERE trainer_id = %s AND "
            "scheduled_time = '09:00' AND status = 'scheduled' "
            "AND extract(isodow FROM scheduled_date) < 6 ORDER BY starts_at LIMIT 1",
            ravi,
        )["id"]
        got, text = post(client, "/actions/substitute", {"session_id": str(nine)}, page="/leaves")
        assert got == 303 and f"is now trainer {sita}'s" in text, text

        got, text = post(
            client,
            "/actions/leave-cancel",
            {"leave_id": str(leave["id"]), "back": "/leaves"},
            page="/leaves",
        )
        assert got == 303 and "cancelled: 18 session(s) back with their trainer, 0 kept" in text
        assert "No leave ahead." in page_text(client.get("/leaves").text)
    assert one(conn, "SELECT cancelled_by FROM trainer_leaves")["cancelled_by"] == "console:Arun"
    lines = conn.execute(
        "SELECT DISTINCT actor FROM stage_history WHERE event IN "
        "('substituted', 'leave', 'substitute_ended')"
    ).fetchall()
    assert lines == [{"actor": "console:Arun"}]


def test_the_trace_tells_the_substitutes_and_the_cancellations(
    conn: Conn, db_url: str, week: dict[str, Any]
) -> None:
    """Done when: visible in `make trace` (and the console's trace, the same story)."""
    from tests.console_world import console, page_text
    from workers.ops import commands as ops

    leave = request(conn, week["ravi"], week["first"], week["last"])
    approve(conn, leave)
    late = week["students"][4]  # weekdays at 15:00: nobody else, all five cancelled
    text = ops.trace(conn, late)
    assert text is not None
    assert "scheduled with a substitute" not in text and "5 cancelled" in text
    assert text.count(f"nobody can take it during trainer {week['ravi']} (Ravi)'s leave") == 5
    daily = week["students"][0]  # 9:00 daily: six with Sita, the Sunday cancelled
    text = ops.trace(conn, daily)
    assert text is not None
    assert "6 scheduled with a substitute" in text, text
    assert text.count(f"(Sita) in place of trainer {week['ravi']} (Ravi), leave {leave}") == 6
    with console(db_url) as client:
        page = page_text(client.get(f"/trace/{daily}").text)
    assert "6 scheduled with a substitute" in page and "substituted" in page


def test_done_when_a_three_day_leave_leaves_no_session_of_the_trainer_in_those_days(
    conn: Conn, db_url: str, week: dict[str, Any]
) -> None:
    """Issue 24's done-when: Friday to Sunday, every session of Ravi's in those days either
    with a substitute who fits every rule for it, or cancelled with its make-up."""
    ravi = week["ravi"]
    first = week["first"] + timedelta(days=3)  # Friday
    last = first + timedelta(days=2)  # Sunday
    leave = request(conn, ravi, first, last, "three days")
    changes = approve(conn, leave)
    assert changes and in_days(conn, ravi, first, last) == []
    drain(db_url)
    for c in changes:
        s = one(
            conn,
            "SELECT ts.*, kc_session_fit(ts.id, ts.trainer_id, ts.scheduled_date, "
            "ts.scheduled_time, true) AS unfit FROM tutoring_sessions ts WHERE id = %s",
            c["session_id"],
        )
        if c["outcome"] == "substituted":
            assert (s["status"], s["unfit"], s["original_trainer_id"]) == ("scheduled", None, ravi)
        else:
            assert c["outcome"] == "cancelled" and s["status"] == "cancelled"
            made_up = one(
                conn,
                "SELECT count(*) FILTER (WHERE status <> 'cancelled') AS standing, "
                "max(session_number) AS last FROM tutoring_sessions WHERE student_id = %s",
                s["student_id"],
            )
            assert made_up["standing"] == 10 and made_up["last"] > 10
    assert in_days(conn, ravi, first, last) == []
    assert violations(conn) == {}


def test_two_leaves_approved_at_once_share_one_substitute_without_double_booking(
    conn: Conn, db_url: str
) -> None:
    """Two trainers' students at 10:00 on the same days, one free substitute: both leaves
    approved at the same moment; each day she takes one of the two sessions."""
    course = f.course(conn)
    start = monday_ahead()
    trainers = []
    for i in range(2):
        lat = f.HOME[0] + 0.5 * i
        trainer = f.trainer(conn, name=f"T{i}", lat=lat + 0.01, lng=f.HOME[1])
        student = f.student(conn, name=f"s{i}", lat=lat)
        buy(
            conn,
            db_url,
            student,
            course,
            scheduleMode="daily",
            timeSlot="10:00",
            startDate=start.isoformat(),
        )
        assert allocation_of(conn, student)["trainer_id"] == trainer
        trainers.append(trainer)
    sub = f.trainer(conn, name="Sub", slot=("09:00", "12:00"), radius_km=1000)
    first, last = start + timedelta(days=1), start + timedelta(days=4)
    leaves = [request(conn, t, first, last) for t in trainers]
    barrier = threading.Barrier(2)
    outcomes: list[list[str]] = []

    def go(leave: int) -> None:
        with psycopg.connect(db_url, autocommit=True, row_factory=dict_row) as mine:
            barrier.wait()
            rows = mine.execute("SELECT outcome FROM approve_leave(%s)", (leave,)).fetchall()
            outcomes.append([r["outcome"] for r in rows])

    threads = [threading.Thread(target=go, args=(leave,)) for leave in leaves]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert (
        sorted(o for each in outcomes for o in each) == ["cancelled"] * 4 + ["substituted"] * 4
    ), outcomes
    days = conn.execute(
        "SELECT scheduled_date, count(*) AS n FROM tutoring_sessions WHERE trainer_id = %s "
        "AND status = 'scheduled' GROUP BY scheduled_date",
        (sub,),
    ).fetchall()
    assert len(days) == 4 and {d["n"] for d in days} == {1}
    drain(db_url)
    assert violations(conn) == {}


def test_the_commands_request_approve_list_cancel_and_substitute(
    conn: Conn, db_url: str, week: dict[str, Any]
) -> None:
    import os
    import subprocess
    import sys

    def kc(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "workers", *args],
            env={**os.environ, "DATABASE_URL": db_url, "KC_LOG_LEVEL": "WARNING"},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    ravi, first, last = str(week["ravi"]), str(week["first"]), str(week["last"])
    asked = kc("leave", "request", ravi, first, last, "--reason", "family wedding")
    assert asked.returncode == 0 and "leave 1 requested" in asked.stdout, asked
    refused = kc("leave", "request", ravi, last, last, "--reason", "again")
    assert refused.returncode == 1 and "already has leave 1" in refused.stderr
    approved = kc("leave", "approve", "1")
    assert approved.returncode == 0, approved
    assert approved.stdout.count(" substituted ") == 18  # a line per session
    assert "leave 1 approved: approved: 18 substituted, 7 cancelled" in approved.stdout
    again = kc("leave", "approve", "1")
    assert again.returncode == 1 and "approved already" in again.stderr
    listed = kc("leave", "list")
    assert listed.returncode == 0 and "family wedding" in listed.stdout
    late = one(
        conn,
        "SELECT id FROM tutoring_sessions WHERE trainer_id = %s AND "
        "scheduled_time = '15:00' AND status = 'scheduled' ORDER BY starts_at LIMIT 1",
        week["ravi"],
    )["id"]
    unfit = kc("substitute", str(late), str(week["sita"]))
    assert unfit.returncode == 1 and "no_free_slot: trainer Sita" in unfit.stderr
    cancelled = kc("leave", "cancel", "1")
    assert cancelled.returncode == 0 and "cancelled: 18 given back, 0 kept" in cancelled.stdout
    assert one(conn, "SELECT approved_by FROM trainer_leaves")["approved_by"] == conn.info.user


def test_a_session_written_into_a_leave_later_is_covered_by_the_sweep(
    conn: Conn, db_url: str, week: dict[str, Any]
) -> None:
    """The course matching does not read leave: a new course written for Ravi after his leave
    was approved has sessions in it; the lifecycle sweep covers them as the approval would."""
    from tests.helpers import run_periodic
    from workers.stages import lifecycle

    ravi, first, last = week["ravi"], week["first"], week["last"]
    leave = request(conn, ravi, first, last)
    approve(conn, leave)
    newcomer = f.student(conn, name="late")
    buy(
        conn,
        db_url,
        newcomer,
        week["course"],
        scheduleMode="daily",
        timeSlot="17:00",
        startDate=week["first"].isoformat(),
        trainerId=str(ravi),
    )
    assert allocation_of(conn, newcomer)["trainer_id"] == ravi
    assert len(in_days(conn, ravi, first, last)) == 7  # written into his leave
    run_periodic(db_url, lifecycle.sweep)
    assert in_days(conn, ravi, first, last) == []
    outcomes = conn.execute(
        "SELECT event FROM stage_history WHERE event IN ('substituted', 'leave') "
        "AND detail LIKE %s",
        ("%at 17:00%",),
    ).fetchall()
    assert [o["event"] for o in outcomes] == ["leave"] * 7  # nobody else at 17:00
    drain(db_url)  # the make-ups, after the course, with Ravi
    assert in_days(conn, ravi, first, last) == []
    assert violations(conn) == {}

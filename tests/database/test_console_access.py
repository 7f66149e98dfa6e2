"""Who may use the console (issue 21): one token per operator, sessions the database keeps,
sign-in before any page beyond loopback, the Host check on every loopback address, the
sign-in throttle and the bound on request bodies. Starlette's test client and real servers
(`python -m workers console`) against a real database."""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg.rows import DictRow
from starlette.routing import Route
from starlette.testclient import TestClient

from tests.console_world import (
    World,
    build_world,
    console,
    csrf_of,
    page_text,
    post,
    sign_in,
)
from tests.helpers import one, wait_for
from workers.console import serve
from workers.console.access import COOKIE, ID_PATTERN, Rate, Throttle
from workers.console.app import create_app

Conn = psycopg.Connection[DictRow]


@pytest.fixture
def world(conn: Conn, db_url: str) -> World:
    return build_world(conn, db_url)


@dataclass
class Clock:
    """The throttle's clock, moved by hand: no test waits for time to pass."""

    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


def replayed(conn: Conn) -> int:
    return int(one(conn, "SELECT count(*) AS n FROM stage_history WHERE event = 'replayed'")["n"])


def set_cookie(response: Any) -> str:
    return str(response.headers.get("set-cookie", ""))


def operator_command(db_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "workers", "operator", *args],
        env={**os.environ, "DATABASE_URL": db_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def free_port(family: socket.AddressFamily = socket.AF_INET, host: str = "127.0.0.1") -> int:
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def ask(
    host: str, port: int, path: str, header_host: str, method: str = "GET"
) -> tuple[int, dict[str, str], str]:
    """One request to a real server, its Host header chosen: status, headers, body."""
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        connection.request(method, path, headers={"Host": header_host})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read().decode()
    finally:
        connection.close()


@contextmanager
def served(db_url: str, host: str, port: int, log: Path) -> Iterator[None]:
    """`python -m workers console --host <host> --port <port>`, until the block ends."""
    with open(log, "ab") as sink:
        process = subprocess.Popen(
            [sys.executable, "-m", "workers", "console", "--host", host, "--port", str(port)],
            env={
                **{k: v for k, v in os.environ.items() if k != "KC_CONSOLE_TOKEN"},
                "DATABASE_URL": db_url,
            },
            stdout=sink,
            stderr=sink,
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    target = "::1" if family == socket.AF_INET6 else "127.0.0.1"

    def listening() -> bool:
        assert process.poll() is None, log.read_text()[-3000:]
        with socket.socket(family) as probe:
            return probe.connect_ex((target, port)) == 0

    try:
        wait_for(listening, 30, "the console to listen")
        yield
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)


# -- 1. beyond loopback, every page needs sign-in ----------------------------------------------


def every_page(client: TestClient, world: World) -> list[str]:
    """Every GET route of the console but the sign-in page, with an id where it takes one,
    and a path no route has: a new page is covered without changing this test."""
    app: Any = client.app
    paths = [
        route.path.replace("{ref}", str(world.waiting))
        for route in app.routes
        if isinstance(route, Route) and "GET" in (route.methods or ()) and route.path != "/signin"
    ]
    assert {"/", "/waiting", "/failures", "/search", f"/trace/{world.waiting}"} <= set(paths)
    return [*paths, "/search?q=meera", f"/search?q={world.waiting}", "/no-such-page"]


def test_beyond_loopback_no_page_answers_before_sign_in(
    world: World, conn: Conn, db_url: str
) -> None:
    before = replayed(conn)
    with console(db_url, beyond_loopback=True) as client:
        for path in every_page(client, world):
            for host in ("127.0.0.1", "evil.example"):
                answer = client.get(path, headers={"host": host}, follow_redirects=False)
                assert answer.status_code == 303, (path, host, answer.status_code)
                assert answer.headers["location"].startswith("/signin?next=%2F"), path
                assert "Meera" not in answer.text and "Asha" not in answer.text
        refused = client.post(
            "/actions/replay", data={"stage": "purchase", "ref_id": str(world.failed)}
        )
        assert refused.status_code == 403
        assert "Sign in with your operator token first" in page_text(refused.text)
        # The sign-in page and the style sheet are all there is to see.
        assert client.get("/signin").status_code == 200
        assert client.get("/static/console.css").status_code == 200
        # Signing in leads back to the page asked for, which now answers.
        asked = client.get(f"/trace/{world.waiting}", follow_redirects=False)
        form = client.get(asked.headers["location"])
        back = re.search(r'name="back" value="([^"]+)"', form.text)
        assert back is not None and back.group(1) == f"/trace/{world.waiting}"
        signed = client.post(
            "/signin",
            data={"csrf": csrf_of(form.text), "token": world.token(), "back": back.group(1)},
            follow_redirects=False,
        )
        assert signed.headers["location"] == f"/trace/{world.waiting}"
        trace = client.get(signed.headers["location"])
        assert trace.status_code == 200 and "Meera Iyer" in page_text(trace.text)
    assert replayed(conn) == before


def test_on_loopback_a_client_elsewhere_still_signs_in_first(world: World, db_url: str) -> None:
    """A loopback console published through a reverse proxy: the proxy forwards the client's
    address (uvicorn takes X-Forwarded-For from loopback), and that client is not reading
    from this machine."""
    for address, reads in (("203.0.113.7", False), ("::1", True), ("127.0.0.1", True)):
        app = create_app(db_url, read_needs_sign_in=False, allowed_hosts=["*"])
        with TestClient(app, base_url="http://127.0.0.1", client=(address, 443)) as client:
            answer = client.get(f"/trace/{world.waiting}", follow_redirects=False)
            assert (answer.status_code == 200, "Meera" in answer.text) == (reads, reads)
            if not reads:
                assert answer.status_code == 303
                sign_in(client, world.token())
                assert "Meera Iyer" in page_text(client.get(f"/trace/{world.waiting}").text)


def test_a_console_on_all_addresses_answers_no_page_without_sign_in(
    world: World, db_url: str, tmp_path: Path
) -> None:
    """The issue's reproduction against a real server on 0.0.0.0: a student's trace, asked
    for with another Host and no cookie, is a redirect to the sign-in page."""
    port = free_port()
    with served(db_url, "0.0.0.0", port, tmp_path / "console.log"):
        status, headers, body = ask("127.0.0.1", port, f"/trace/{world.waiting}", "evil.example")
        signin, _, form = ask("127.0.0.1", port, "/signin", "evil.example")
    assert status == 303 and headers["location"].startswith("/signin?next=")
    assert "Meera" not in body
    assert signin == 200 and 'name="token"' in form


# -- 5. a token per operator, made by the command; the throttle; no oracle ---------------------


def test_operator_add_prints_a_random_token_once_and_keeps_only_its_hash(
    conn: Conn, db_url: str
) -> None:
    tokens = []
    for name in ("Priya", "Arun"):
        added = operator_command(db_url, "add", name)
        assert added.returncode == 0, added.stderr
        found = re.search(r"^    ([A-Za-z0-9_-]+)$", added.stdout, re.MULTILINE)
        assert found is not None, added.stdout
        assert f"operator {name} is added" in added.stdout and "shown this once" in added.stdout
        tokens.append(found.group(1))
    assert len(set(tokens)) == 2 and all(ID_PATTERN.fullmatch(t) for t in tokens)
    stored = conn.execute(
        "SELECT name, token_hash = sha256(convert_to(%s, 'UTF8')) "
        "OR token_hash = sha256(convert_to(%s, 'UTF8')) AS hashed, "
        "row_to_json(o)::text AS everything FROM console_operators o ORDER BY id",
        tokens,
    ).fetchall()
    assert [(r["name"], r["hashed"]) for r in stored] == [("Priya", True), ("Arun", True)]
    assert not any(t in r["everything"] for t in tokens for r in stored)
    # A token the command did not make (short, guessable, not URL-safe) cannot be stored,
    # even by hand.
    for weak in ("aaaaaaaaaaaaaaaa", "x" * 42, "correct horse battery staple " * 2, ""):
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="43 to 200 URL-safe"):
            conn.execute("SELECT * FROM console_operator_add('Dev', %s)", (weak,))
    assert one(conn, "SELECT count(*) AS n FROM console_operators")["n"] == 2


def test_sign_in_is_throttled_per_client(world: World, conn: Conn, db_url: str) -> None:
    """100 wrong tries at once: 5 are checked, 95 refused before the database is asked (even
    the right token, while the limit holds); 10 s later the next one is checked."""
    clock = Clock()
    throttle = Throttle(per_client=Rate(5, 10.0), overall=Rate(1000, 0.001), clock=clock)
    with console(db_url, throttle=throttle) as client:
        csrf = csrf_of(client.get("/signin").text)
        answers = [
            client.post("/signin", data={"csrf": csrf, "token": f"guess-{i:040d}"})
            for i in range(100)
        ]
        assert Counter(a.status_code for a in answers) == {403: 5, 429: 95}
        assert [a.status_code for a in answers[:5]] == [403] * 5
        last = answers[-1]
        assert last.headers["retry-after"] == "10"
        assert "Too many sign-in attempts from your address" in page_text(last.text)
        right = client.post("/signin", data={"csrf": csrf, "token": world.token()})
        assert right.status_code == 429
        assert one(conn, "SELECT count(*) AS n FROM console_sessions")["n"] == 0
        clock.now += 10
        sign_in(client, world.token())
    assert one(conn, "SELECT count(*) AS n FROM console_sessions")["n"] == 1


def test_sign_in_is_throttled_overall(world: World, db_url: str) -> None:
    clock = Clock()
    throttle = Throttle(per_client=Rate(100, 1.0), overall=Rate(3, 20.0), clock=clock)
    with console(db_url, throttle=throttle) as client:
        csrf = csrf_of(client.get("/signin").text)
        statuses = [
            client.post("/signin", data={"csrf": csrf, "token": "wrong"}).status_code
            for _ in range(4)
        ]
        limited = client.post("/signin", data={"csrf": csrf, "token": world.token()})
        assert statuses == [403, 403, 403, 429]
        assert "Too many sign-in attempts on this console at once" in page_text(limited.text)
        assert limited.headers["retry-after"] == "20"
        clock.now += 20
        sign_in(client, world.token())


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.floats(0, 30, allow_nan=False)), min_size=1, max_size=80
    )
)
def test_the_throttle_never_lets_more_through_than_its_rates(
    attempts: list[tuple[int, float]],
) -> None:
    """Token buckets: in any run, a client gets at most burst + elapsed / every attempts,
    everyone together at most the overall burst + elapsed / every; and a client refused who
    waits as told (once per limit: its own, then everyone's) goes through when nobody else
    tried in between."""
    clock = Clock()
    per_client, overall = Rate(5, 10.0), Rate(8, 2.0)
    throttle = Throttle(per_client=per_client, overall=overall, clock=clock)
    start = clock.now
    allowed: Counter[int] = Counter()
    for client, pause in attempts:
        clock.now += pause
        answer = throttle.attempt(f"10.0.0.{client}")
        if answer is None:
            allowed[client] += 1
        elapsed = clock.now - start
        assert allowed[client] <= per_client.burst + elapsed / per_client.every + 1e-9
        assert sum(allowed.values()) <= overall.burst + elapsed / overall.every + 1e-9
    for _ in range(2):
        if answer is None:
            break
        clock.now += answer[1]
        answer = throttle.attempt(f"10.0.0.{client}")
    assert answer is None


def test_a_visitor_s_cookie_is_an_opaque_random_id(world: World, db_url: str) -> None:
    """Nothing in a cookie comes from a token: a visitor gets 256 random bits, no signed
    payload to guess a key against; the CSRF token is keyed by each console's own random key."""
    with console(db_url) as first, console(db_url) as second:
        one_visit, other_visit = first.get("/signin"), second.get("/signin")
        cookies = [set_cookie(one_visit), set_cookie(other_visit)]
        ids = [c.split(";")[0].removeprefix(f"{COOKIE}=") for c in cookies]
        for cookie, value in zip(cookies, ids, strict=True):
            assert ID_PATTERN.fullmatch(value), cookie
            assert cookie == f"{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict"
        assert ids[0] != ids[1]
        # The same cookie on two consoles of the same database and operators: different
        # CSRF tokens (each console's key is its own), and neither is the cookie.
        second.cookies.set(COOKIE, ids[0])
        tokens = {csrf_of(one_visit.text), csrf_of(second.get("/signin").text), ids[0]}
    assert len(tokens) == 3


# -- 6. sessions in the database: revoked, signed out, absolute expiry, Secure ------------------


def test_a_revoked_operator_s_sessions_stop_at_once(world: World, conn: Conn, db_url: str) -> None:
    with console(db_url) as client:
        sign_in(client, world.token("Priya"))
        csrf = csrf_of(client.get("/failures").text)
        assert "signed in as Priya" in page_text(client.get("/").text)
        revoked = operator_command(db_url, "revoke", "priya")
        assert revoked.returncode == 0, revoked.stderr
        assert "1 session(s) of theirs ended now" in revoked.stdout
        assert "signed in as" not in page_text(client.get("/").text)
        acted = client.post(
            "/actions/replay",
            data={"csrf": csrf, "stage": "purchase", "ref_id": str(world.failed)},
        )
        assert acted.status_code == 403
        again = post(client, "/signin", {"token": world.token("Priya")}, page="/signin")
        assert again[0] == 403 and "a revoked operator's no longer works" in again[1]
        # A new token for the same person: the old one stays dead, the new one works.
        renewed = operator_command(db_url, "add", "Priya")
        assert renewed.returncode == 0 and "operator Priya has a new token" in renewed.stdout
        found = re.search(r"^    ([A-Za-z0-9_-]+)$", renewed.stdout, re.MULTILINE)
        assert found is not None
        assert post(client, "/signin", {"token": world.token("Priya")}, page="/signin")[0] == 403
        sign_in(client, found.group(1))
    assert replayed(conn) == 0
    assert one(conn, "SELECT count(*) AS n FROM console_sessions WHERE ended_at IS NULL") == {
        "n": 1
    }


def test_a_cookie_saved_before_sign_out_acts_no_more(world: World, conn: Conn, db_url: str) -> None:
    with console(db_url) as client:
        sign_in(client, world.token("Priya"))
        saved = client.cookies.get(COOKIE)
        assert saved is not None
        assert post(client, "/signout", {})[0] == 303
        # Someone kept the cookie: they get the page's CSRF token for it, and try.
        client.cookies.clear()
        client.cookies.set(COOKIE, saved)
        csrf = csrf_of(client.get("/signin").text)
        answer = client.post(
            "/actions/replay",
            data={"csrf": csrf, "stage": "purchase", "ref_id": str(world.failed)},
        )
    assert answer.status_code == 403
    assert replayed(conn) == 0


def test_a_session_ends_12_hours_after_sign_in_however_it_is_used(
    world: World, conn: Conn, db_url: str
) -> None:
    with console(db_url) as client:
        form = client.get("/signin")
        signed = client.post(
            "/signin",
            data={"csrf": csrf_of(form.text), "token": world.token()},
            follow_redirects=False,
        )
        max_age = re.search(r"Max-Age=(\d+)", set_cookie(signed))
        assert max_age is not None and 12 * 3600 - 60 <= int(max_age.group(1)) <= 12 * 3600
        session = one(conn, "SELECT signed_in_at, expires_at FROM console_sessions")
        assert session["expires_at"] - session["signed_in_at"] == timedelta(hours=12)
        for path in ("/", "/failures", f"/trace/{world.waiting}", "/"):
            page = client.get(path)
            assert "signed in as Priya" in page_text(page.text)
            assert "set-cookie" not in page.headers  # the cookie is not renewed
        assert one(conn, "SELECT expires_at FROM console_sessions") == {
            "expires_at": session["expires_at"]
        }
        # Twelve hours later, as the database sees it.
        conn.execute(
            "UPDATE console_sessions SET signed_in_at = signed_in_at - interval '12 hours', "
            "expires_at = now()"
        )
        assert "signed in as" not in page_text(client.get("/").text)
        status, text = post(
            client,
            "/actions/replay",
            {"stage": "purchase", "ref_id": str(world.failed)},
            page="/signin",
        )
    assert status == 403 and "Sign in with your operator token first" in text
    assert replayed(conn) == 0


def test_the_cookie_is_secure_over_https(world: World, db_url: str) -> None:
    with console(db_url, base_url="https://127.0.0.1") as client:
        visitor = set_cookie(client.get("/signin"))
        form = client.get("/signin")
        signed = client.post(
            "/signin",
            data={"csrf": csrf_of(form.text), "token": world.token()},
            follow_redirects=False,
        )
    assert visitor.endswith("; HttpOnly; SameSite=Strict; Secure")
    assert set_cookie(signed).endswith("; Secure") and "HttpOnly" in set_cookie(signed)
    with console(db_url) as plain:  # over plain HTTP a browser would drop a Secure cookie
        assert "Secure" not in set_cookie(plain.get("/signin"))


# -- 9. the Host check on every loopback address ------------------------------------------------


@pytest.mark.parametrize("listen", ["::1", "127.0.0.1", "127.0.0.2", "localhost"])
def test_on_every_loopback_address_other_host_names_are_refused(db_url: str, listen: str) -> None:
    app = create_app(db_url, read_needs_sign_in=False, allowed_hosts=serve.allowed_hosts(listen))
    with TestClient(app, base_url="http://127.0.0.1") as client:
        for other in ("evil.example", "evil.example:8080", "10.0.0.1", "[2001:db8::1]:8080"):
            assert client.get("/signin", headers={"host": other}).status_code == 400, other
        for own in ("127.0.0.1:8080", "localhost:8080", "[::1]:8080"):
            assert client.get("/signin", headers={"host": own}).status_code == 200, own


def test_a_console_on_ipv6_loopback_refuses_another_host(db_url: str, tmp_path: Path) -> None:
    """The issue's reproduction against a real server on ::1 (no operator at all)."""
    port = free_port(socket.AF_INET6, "::1")
    with served(db_url, "::1", port, tmp_path / "console.log"):
        rebound = ask("::1", port, "/", "evil.example")
        own = ask("::1", port, "/", f"[::1]:{port}")
    assert rebound[0] == 400
    assert own[0] == 200


# -- 12. request bodies are bounded before anything reads them ---------------------------------

FIELD = 1_000_000  # 1,000 fields of 1 MB: the body the reproduction sent
FIELDS = 1000


def asgi_post(
    app: Any, headers: list[tuple[bytes, bytes]], chunks: Iterator[bytes]
) -> tuple[int, int]:
    """POST /signin straight to the application: its status, and how many chunks of the body
    it read."""
    read = 0
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal read
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        read += 1
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/signin",
        "raw_path": b"/signin",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:8080"), *headers],
        "client": ("10.0.0.9", 40000),
        "server": ("127.0.0.1", 8080),
    }
    asyncio.run(app(scope, receive, send))
    return status, read


def fields() -> Iterator[bytes]:
    """1,000 fields of 1 MB each, made only as they are read."""
    for i in range(FIELDS):
        yield f"f{i}=".encode() + b"x" * FIELD + b"&"


def test_a_huge_sign_in_is_refused_before_it_is_read(db_url: str) -> None:
    app = create_app(db_url, read_needs_sign_in=True)
    form = (b"content-type", b"application/x-www-form-urlencoded")
    declared = (b"content-length", str(FIELDS * (FIELD + 6)).encode())
    # A declared length: refused at once, nothing read.
    assert asgi_post(app, [form, declared], fields()) == (413, 0)
    # No length (streamed): refused at the first chunk past the limit.
    assert asgi_post(app, [form], fields()) == (413, 1)
    # Not a form: refused at once (no multipart parser runs).
    multipart = (b"content-type", b"multipart/form-data; boundary=x")
    assert asgi_post(app, [multipart], fields()) == (415, 0)


def test_a_real_server_answers_a_huge_declared_body_without_reading_it(
    db_url: str, tmp_path: Path
) -> None:
    """Headers saying 1 GB, then a little of it: the answer (413) comes without the rest."""
    port = free_port()
    log = tmp_path / "console.log"
    with (
        served(db_url, "127.0.0.1", port, log),
        socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
    ):
        raw.sendall(
            b"POST /signin HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/x-www-form-urlencoded\r\n"
            + f"Content-Length: {FIELDS * (FIELD + 6)}\r\n\r\n".encode()
            + b"f0="
            + b"x" * 65536
        )
        answer = raw.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


# -- the operator command -----------------------------------------------------------------------


def test_operator_commands_add_list_revoke_and_say_what_is_wrong(
    conn: Conn, db_url: str, admin_url: str
) -> None:
    assert operator_command(db_url, "list").stdout.startswith("no console operator yet")
    assert operator_command(db_url, "add", "Priya").returncode == 0
    twice = operator_command(db_url, "add", "priya")
    assert twice.returncode == 1
    assert "refused: operator Priya already has a token (to give Priya a new one: revoke it" in (
        twice.stderr
    )
    blank = operator_command(db_url, "add", "   ")
    assert blank.returncode == 1 and "1 to 60 printable characters" in blank.stderr
    listed = operator_command(db_url, "list").stdout
    assert re.search(r"^Priya\s+live\s", listed, re.MULTILINE), listed
    nobody = operator_command(db_url, "revoke", "Nobody")
    assert nobody.returncode == 1 and "no console operator is named Nobody" in nobody.stderr
    assert operator_command(db_url, "revoke", "Priya").returncode == 0
    again = operator_command(db_url, "revoke", "Priya")
    assert again.returncode == 1 and "was already revoked" in again.stderr
    assert re.search(r"^Priya\s+revoked ", operator_command(db_url, "list").stdout, re.MULTILINE)
    # Only the owner manages operators: a login in kc_operator is told so.
    login = f"kc_test_operator_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {login} LOGIN IN ROLE kc_operator")
    try:
        parts = urlsplit(db_url)
        as_operator = parts._replace(netloc=f"{login}@{parts.netloc.rsplit('@', 1)[-1]}").geturl()
        denied = operator_command(as_operator, "add", "Mallory")
        assert denied.returncode == 1
        # Operators are the owner's: a login that may not act as kc_owner is told the GRANT.
        assert f"the login {login} may not act as kc_owner" in denied.stderr
        assert f"GRANT kc_owner TO {login}" in denied.stderr
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f"DROP ROLE IF EXISTS {login}")
    assert [r["name"] for r in conn.execute("SELECT name FROM console_operators")] == ["Priya"]


def test_operator_help_says_what_each_action_does() -> None:
    helped = subprocess.run(
        [sys.executable, "-m", "workers", "operator", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    for word in ("add", "list", "revoke", "SHA-256", "owner", "console:<name>"):
        assert word in helped.stdout, word
    bare = subprocess.run(
        [sys.executable, "-m", "workers", "operator"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bare.returncode == 2 and "ACTION" in bare.stderr


def test_make_lists_and_adds_operators(conn: Conn, db_url: str) -> None:
    from workers.settings import REPO_ROOT

    env = {**os.environ, "DATABASE_URL": db_url}
    usage = subprocess.run(
        ["make", "-s", "-C", str(REPO_ROOT), "operator-add"],
        env={k: v for k, v in env.items() if k != "NAME"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert usage.returncode == 2 and "usage: make operator-add NAME=" in usage.stdout
    added = subprocess.run(
        ["make", "-s", "-C", str(REPO_ROOT), "operator-add", "NAME=Asha Rao"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "operator Asha Rao is added" in added.stdout
    listed = subprocess.run(
        ["make", "-s", "-C", str(REPO_ROOT), "operators"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert re.search(r"^Asha Rao\s+live\s", listed.stdout, re.MULTILINE), listed.stdout

"""`make console`: the checks made before listening (a retired setting, the database's
migrations and role, an operator who may sign in when it listens beyond loopback), then
uvicorn."""

from __future__ import annotations

import ipaddress
import logging

import psycopg

from workers.database import migrate
from workers.database.connections import OPERATOR_ROLE, connect_sync
from workers.database.sql import q
from workers.errors import ConfigurationError
from workers.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
ADD_OPERATOR = "python -m workers operator add <name> (make operator-add NAME=<name>)"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def check_no_shared_token(settings: Settings) -> None:
    """KC_CONSOLE_TOKEN is gone: one shared token could not say who did what. Set, it is an
    error rather than ignored, so that nobody believes it still guards anything."""
    if settings.console_token is not None and settings.console_token.get_secret_value():
        raise ConfigurationError(
            "KC_CONSOLE_TOKEN is no longer used: each person now signs in with a token of "
            "their own, which names them in the history. Create one per person with "
            f"{ADD_OPERATOR} (python -m workers operator list shows them), then unset "
            "KC_CONSOLE_TOKEN."
        )


def check_address(host: str, operators: int | None) -> None:
    """Beyond loopback every page needs sign-in, so a console nobody can sign in to would
    answer nothing: refuse it, saying how to add an operator. `operators`: how many may sign
    in (None: the database did not answer; the console starts and asks again on each
    sign-in)."""
    if operators == 0 and not is_loopback(host):
        raise ConfigurationError(
            f"refusing to listen on {host}: beyond loopback every page needs sign-in, and no "
            f"operator may sign in yet. Add one per person with {ADD_OPERATOR}, or leave "
            "--host at its default (127.0.0.1, where reading needs no sign-in)."
        )


def allowed_hosts(host: str) -> list[str]:
    """The Host headers accepted: on any loopback address (IPv4 or IPv6) only loopback names,
    so that a web page elsewhere cannot reach the console by pointing its own name at this
    machine (DNS rebinding). Beyond loopback any: every page needs sign-in there, and a
    rebound page does not carry the console's cookie."""
    if not is_loopback(host):
        return ["*"]
    bare = host.strip("[]").lower()
    named = f"[{bare}]" if ":" in bare else bare
    return sorted({"127.0.0.1", "localhost", "[::1]", named})


def check_database(url: str) -> int | None:
    """A login that may not act as kc_operator, or a database not migrated to head, is a
    ConfigurationError; a database that does not answer yet is only a warning (the console
    starts, says so on its pages, and connects when the server answers). Returns how many
    operators may sign in (None when the database did not answer)."""
    try:
        conn = connect_sync(url, timeout=5)
    except ConfigurationError as exc:
        if "permission denied for database" in str(exc.__cause__ or exc):
            # It answers, and says no: the login has no CONNECT (docs/security.md). Waiting
            # would never help.
            raise ConfigurationError(
                f"{exc}: the console's login may not connect to this database; GRANT CONNECT "
                "to it, or a DATABASE_URL whose login is in kc_operator"
            ) from None
        log.warning("%s; the console starts and connects once it answers", exc)
        return None
    with conn:
        try:
            conn.execute(f"SET ROLE {OPERATOR_ROLE}")
        except psycopg.Error as exc:
            login = conn.info.user
            raise ConfigurationError(
                f"the console acts as {OPERATOR_ROLE}, and the login {login} may not "
                f"({exc.diag.message_primary}): GRANT {OPERATOR_ROLE} TO {login}; or a "
                f"DATABASE_URL whose login is in {OPERATOR_ROLE} (make migrate creates the role)"
            ) from None
        current, head = migrate.current_revision(conn), migrate.head_revision()
        if current != head:
            raise ConfigurationError(
                f"the database's migrations are at {current}, the console needs {head}: "
                "make migrate"
            )
        row = conn.execute(q("console_operator_count")).fetchone()
        return int(row["operators"]) if row is not None else 0


def serve(url: str, settings: Settings, host: str, port: int) -> int:
    import uvicorn

    from workers.console.app import create_app

    check_no_shared_token(settings)
    operators = check_database(url)
    check_address(host, operators)
    loopback = is_loopback(host)
    app = create_app(
        url,
        read_needs_sign_in=not loopback,
        allowed_hosts=allowed_hosts(host),
        leave_handover_days=settings.leave_handover_days,
    )
    shown = f"[{host}]" if ":" in host else host
    if operators is None:
        who = "operators: the database does not answer yet"
    elif operators:
        who = f"{operators} operator(s) may sign in to act"
    else:
        who = f"nobody may act until an operator is added: {ADD_OPERATOR}"
    reading = "reading needs no sign-in on loopback" if loopback else "every page needs sign-in"
    log.info("console on http://%s:%d/ (%s; %s)", shown, port, reading, who)
    # log_config=None: uvicorn's loggers use the pipeline's format (workers.cli).
    uvicorn.run(app, host=host, port=port, log_config=None, server_header=False)
    return 0

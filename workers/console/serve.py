"""`make console`: the checks made before listening (the address against the token, the
database's migrations and role), then uvicorn."""

from __future__ import annotations

import ipaddress
import logging

import psycopg

from workers.database import migrate
from workers.database.connections import OPERATOR_ROLE, connect_sync
from workers.errors import ConfigurationError
from workers.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
TOKEN_MIN_LENGTH = 16


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def console_token(settings: Settings) -> str | None:
    """KC_CONSOLE_TOKEN, checked (its value is never repeated in a message); None when unset
    or empty: read-only."""
    if settings.console_token is None:
        return None
    token = settings.console_token.get_secret_value()
    if not token:
        return None
    if len(token) < TOKEN_MIN_LENGTH:
        raise ConfigurationError(
            f"KC_CONSOLE_TOKEN has {len(token)} characters; it needs at least "
            f"{TOKEN_MIN_LENGTH} (for example: python3 -c 'import secrets; "
            "print(secrets.token_urlsafe(24))')"
        )
    return token


def check_address(host: str, token: str | None) -> None:
    """Anything but loopback needs a token: a read-only console still shows students'
    names and schedules, so it stays on this machine unless someone may act."""
    if token is None and not is_loopback(host):
        raise ConfigurationError(
            f"refusing to listen on {host} without KC_CONSOLE_TOKEN: without a token the "
            "console listens on loopback only (127.0.0.1, ::1 or localhost). Set "
            "KC_CONSOLE_TOKEN (at least 16 characters), or leave --host at its default."
        )


def allowed_hosts(host: str) -> list[str]:
    """The Host headers accepted: on loopback only loopback names, so that a web page
    elsewhere cannot reach the console by pointing its own name at 127.0.0.1."""
    if host.lower() == "localhost" or host.startswith("127."):
        return ["127.0.0.1", "localhost", host]
    return ["*"]


def check_database(url: str) -> None:
    """A login that may not act as kc_operator, or a database not migrated to head, is a
    ConfigurationError; a database that does not answer yet is only a warning (the console
    starts, says so on its pages, and connects when the server answers)."""
    try:
        conn = connect_sync(url, timeout=5)
    except ConfigurationError as exc:
        log.warning("%s; the console starts and connects once it answers", exc)
        return
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


def serve(url: str, settings: Settings, host: str, port: int) -> int:
    import uvicorn

    from workers.console.app import create_app

    token = console_token(settings)
    check_address(host, token)
    check_database(url)
    app = create_app(url, token, allowed_hosts=allowed_hosts(host))
    shown = f"[{host}]" if ":" in host else host
    log.info(
        "console on http://%s:%d/ (%s)",
        shown,
        port,
        "actions need the token" if token else "read-only: KC_CONSOLE_TOKEN is not set",
    )
    # log_config=None: uvicorn's loggers use the pipeline's format (workers.ops.cli).
    uvicorn.run(app, host=host, port=port, log_config=None, server_header=False)
    return 0

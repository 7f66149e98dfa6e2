"""Which database to use: DATABASE_URL when set, otherwise the embedded local server.

Each part of the pipeline asks for the URL of its role: migrations and `make psql` the owner's
(kc_owner), the workers the worker's (kc_worker), the console and the operator commands the
operator's (kc_operator). With DATABASE_URL all three are that URL, and each part acts as its
role once connected (connections.role_options); on the embedded server each is a login of
its own (embedded.LOGINS), so no part of the pipeline connects as the superuser.
"""

from __future__ import annotations

import logging

import psycopg

from workers.database.connections import OWNER_ROLE
from workers.database.embedded import EmbeddedServer
from workers.errors import ConfigurationError
from workers.settings import Settings

log = logging.getLogger(__name__)

LOCAL_SERVER_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def embedded(settings: Settings) -> EmbeddedServer:
    return EmbeddedServer(settings.embedded_dir)


def pipeline_url(settings: Settings, role: str = OWNER_ROLE) -> str:
    """The pipeline's database, for the part of the pipeline that acts as `role`."""
    if settings.database_url:
        return settings.database_url
    server = embedded(settings)
    server.ensure_running()
    return server.login_url(role)


def running_pipeline_url(settings: Settings, role: str = OWNER_ROLE) -> str:
    """The pipeline's database for an operator's command (status, trace, psql, the console):
    like `pipeline_url`, but a stopped embedded server is not started behind their back."""
    if settings.database_url:
        return settings.database_url
    server = embedded(settings)
    if not server.is_running():
        raise ConfigurationError(
            f"the embedded PostgreSQL ({server.cluster_dir}) is not running: start the "
            "pipeline with `make run-workers`, or only its server with `make db-start`"
        )
    return server.login_url(role)


def test_admin_url(settings: Settings) -> str:
    """A server on which tests may create and drop databases (they never touch the
    pipeline's own database). KC_TEST_SERVER: 'local' = 127.0.0.1:5432, 'embedded' = the
    embedded one, 'auto' = local when one answers there, otherwise embedded."""
    if settings.test_server != "embedded":
        try:
            with psycopg.connect(LOCAL_SERVER_URL, connect_timeout=3):
                return LOCAL_SERVER_URL
        except psycopg.OperationalError as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            if settings.test_server == "local":
                raise ConfigurationError(
                    f"KC_TEST_SERVER=local but no PostgreSQL answers on 127.0.0.1:5432 "
                    f"as user postgres ({reason})"
                ) from None
            log.info("no PostgreSQL on 127.0.0.1:5432 (%s); using the embedded server", reason)
    server = embedded(settings)
    server.ensure_running()
    return server.admin_url()

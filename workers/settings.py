"""Configuration, read only from the environment (pydantic-settings)."""

from __future__ import annotations

from datetime import time
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Every knob of the pipeline. Each field names the environment variable it reads."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=False, frozen=True)

    database_url: str | None = Field(
        default=None,
        validation_alias="DATABASE_URL",
        description="libpq URL of the database; unset means the embedded local PostgreSQL.",
    )
    default_time_slot: time = Field(
        default=time(16, 0),
        validation_alias="KC_DEFAULT_TIME_SLOT",
        description="Session start used when a payment's metadata has no timeSlot.",
    )
    retired_max_sequential_distance_km: str | None = Field(
        # Read only to refuse it (below): the value lives in the database now.
        default=None,
        validation_alias="MAX_SEQUENTIAL_DISTANCE_KM",
        description="Retired: the distance between a trainer's neighbouring home sessions is "
        "kc_settings.max_sequential_km, the one value every search reads; set, it is an error.",
    )
    batch_size: int = Field(
        default=10,
        ge=1,
        le=1000,
        validation_alias="KC_BATCH_SIZE",
        description="Jobs a worker claims per dequeue.",
    )
    stage_batch_size: int = Field(
        default=20,
        ge=1,
        le=1000,
        validation_alias="KC_STAGE_BATCH_SIZE",
        description="Most jobs of one stage a worker runs together in one transaction.",
    )
    stage_batches: int = Field(
        default=2,
        ge=1,
        le=50,
        validation_alias="KC_STAGE_BATCHES",
        description="Batches of one stage a worker process runs at the same time.",
    )
    pool_size: int = Field(
        default=10,
        ge=1,
        le=200,
        validation_alias="KC_POOL_SIZE",
        description="Database connections a worker process uses for stage work.",
    )
    max_attempts: int = Field(
        default=5,
        ge=1,
        le=100,
        validation_alias="KC_MAX_ATTEMPTS",
        description="Attempts of a job that keeps raising before it is held as failed.",
    )
    idle_poll_seconds: float = Field(
        default=5.0,
        gt=0,
        le=300,
        validation_alias="KC_IDLE_POLL_SECONDS",
        description="Longest wait for work without a notification before polling the queue.",
    )
    pending_retry_seconds: int = Field(
        default=300,
        ge=1,
        validation_alias="KC_PENDING_RETRY_SECONDS",
        description="The minute-by-minute sweep retries a pending allocation this long after "
        "its first try, then waits twice as long after each unsuccessful one (at most a day); "
        "500 rows a run at most.",
    )
    heal_after_seconds: int = Field(
        default=120,
        ge=1,
        validation_alias="KC_HEAL_AFTER_SECONDS",
        description="The minute-by-minute healer re-enqueues rows stuck longer than this.",
    )
    heartbeat_seconds: float = Field(
        # Measured at 7 under a 10,000-payment backlog (2 workers): a live job's heartbeat
        # was at most 4.34 s old (beats every 3.5 s) and no job was picked twice without a
        # failure; a crashed worker's job was picked again 3.7-6.5 s after the kill. Bound:
        # 7 + the idle poll, capped at a quarter of it = 8.75 s (runtime.recovery_bound).
        default=7.0,
        ge=1,
        le=3600,
        validation_alias="KC_HEARTBEAT_SECONDS",
        description="A running job whose worker has not beaten for this long is picked again "
        "(it beats every half of this; an idle worker polls at least every quarter).",
    )
    statement_timeout_seconds: float = Field(
        default=60.0,
        gt=0,
        validation_alias="KC_STATEMENT_TIMEOUT_SECONDS",
        description="Longest statement of a stage; a stuck one is cancelled and retried.",
    )
    completion_grace_minutes: int = Field(
        default=60,
        ge=0,
        le=7 * 24 * 60,
        validation_alias="KC_COMPLETION_GRACE_MINUTES",
        description="After a session ends, how long the app may still mark it missed or "
        "cancelled before the lifecycle job records it completed.",
    )
    lifecycle_batch: int = Field(
        default=2000,
        ge=1,
        le=100_000,
        validation_alias="KC_LIFECYCLE_BATCH",
        description="Most sessions, and most courses, the lifecycle job completes per run.",
    )
    leave_handover_days: int = Field(
        default=14,
        ge=1,
        le=365,
        validation_alias="KC_LEAVE_HANDOVER_DAYS",
        description="A trainer's leave longer than this many days hands their courses over "
        "to other trainers (as when a trainer leaves) instead of a substitute per session.",
    )
    retention_days: int = Field(
        default=30,
        ge=1,
        validation_alias="KC_RETENTION_DAYS",
        description="stage_history and pgqueuer_log older than this are pruned daily.",
    )
    shutdown_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        validation_alias="KC_SHUTDOWN_SECONDS",
        description="After SIGTERM, how long jobs in flight may run before the worker exits.",
    )
    workers: int = Field(
        default=2,
        ge=1,
        le=64,
        validation_alias="KC_WORKERS",
        description="Worker processes `run` starts and keeps alive (make run-workers).",
    )
    queue_driver: Literal["listening", "pgqueuer"] = Field(
        default="listening",
        validation_alias="KC_QUEUE_DRIVER",
        description="'listening': a dedicated LISTEN connection (ms wake-up); 'pgqueuer': "
        "pgqueuer 1.6's own psycopg driver (1 s polls), kept for comparison.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        default="INFO",
        validation_alias="KC_LOG_LEVEL",
    )
    embedded_dir: Path = Field(
        default=REPO_ROOT / ".pgdata",
        validation_alias="KC_EMBEDDED_DIR",
        description="Folder of the embedded PostgreSQL (data, socket, log; as root: the "
        "lock and a pointer to its cluster under /var/lib/kcpg).",
    )
    test_server: Literal["auto", "local", "embedded"] = Field(
        default="auto",
        validation_alias="KC_TEST_SERVER",
        description="Server `make test` creates its databases on: 'local' = 127.0.0.1:5432, "
        "'embedded' = the embedded one, 'auto' = local when it answers, else embedded.",
    )

    redis_url: SecretStr | None = Field(
        # A secret: it may carry Redis's password. The relay logs it without one.
        default=None,
        validation_alias="REDIS_URL",
        description="Redis (redis://host:port/db) the relay publishes the business events to "
        "(Pub/Sub channel business-events and the stream business-events:stream); set, "
        "`make run-workers` also runs the relay. Unset: no relay, nothing else changes.",
    )
    events_stream_maxlen: int = Field(
        default=100_000,
        ge=1000,
        le=100_000_000,
        validation_alias="KC_EVENTS_STREAM_MAXLEN",
        description="Length the Redis stream business-events:stream is trimmed to (at least "
        "this many of the latest events are kept; Redis trims in whole blocks).",
    )
    relay_batch: int = Field(
        default=500,
        ge=1,
        le=10_000,
        validation_alias="KC_RELAY_BATCH",
        description="Most events the relay reads and publishes per round trip.",
    )

    console_token: SecretStr | None = Field(
        # Read only to refuse it: the console stops with what replaced it (serve.py).
        default=None,
        validation_alias="KC_CONSOLE_TOKEN",
        description="Retired: the console's one shared token. Each person now has a token of "
        "their own (python -m workers operator add <name>); set, the console refuses to start.",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError("REDIS_URL is redis://host:port/db (rediss:// with TLS, unix://path)")
        return value

    @field_validator("retired_max_sequential_distance_km")
    @classmethod
    def _retired_distance(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError(
                "MAX_SEQUENTIAL_DISTANCE_KM is no longer read: the distance between a "
                "trainer's neighbouring home sessions is kept in the database, one value for "
                "the allocation stage, moves and substitutes. Unset it, and set the value with "
                f"make psql: UPDATE kc_settings SET max_sequential_km = {value};"
            )
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value


def load_settings() -> Settings:
    return Settings()

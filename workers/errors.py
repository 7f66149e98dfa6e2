"""The project's exceptions: one base, specific subclasses with messages a person can act on."""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of every error this project raises on purpose."""


class ConfigurationError(PipelineError):
    """The environment does not describe a usable setup (bad variable, missing tool)."""


class EmbeddedDatabaseError(PipelineError):
    """The embedded PostgreSQL could not be initialised, started or stopped."""


class DatabaseRefusalError(PipelineError):
    """The database refused a write (a constraint or a trigger's check): the message says which."""


class InconsistentStateError(PipelineError):
    """What a stage read in its own transaction no longer holds a moment later (a bug, or a
    row changed by hand): the transaction rolls back and the job is retried, rather than
    leave a purchase half-done."""


class InvalidPurchaseError(PipelineError):
    """A payment cannot become a purchase; the payment is rejected, not retried.

    `reason` is a short machine-readable code; `errors` lists one entry per problem
    (field and message) so the person fixing the row sees every problem at once.
    """

    def __init__(
        self, reason: str, errors: list[dict[str, str]], *, keep_metadata: bool = True
    ) -> None:
        self.reason = reason
        self.errors = errors
        # False when the metadata itself is too large or too deep to copy into the rejection.
        self.keep_metadata = keep_metadata
        super().__init__(f"{reason}: " + "; ".join(f"{e['field']}: {e['message']}" for e in errors))


class PermanentJobError(PipelineError):
    """Retrying cannot help: the job is held as failed at once, for an operator to replay."""


class ScheduleError(PermanentJobError):
    """No schedule can be built from the given rules (for example every day is a holiday)."""


class StageNotFoundError(PermanentJobError):
    """A job names a stage or a row that does not exist."""


class TooManyAttemptsError(PermanentJobError):
    """A job was started max_attempts times without finishing (worker crashes included)."""


class InvalidTimezoneError(PermanentJobError):
    """A time zone name that is not an IANA zone (`localtime`, a path, a typo), for instance a
    student's changed after the purchase: no retry helps."""


class RequestRefused(PipelineError):
    """The operations console refuses a request (no sign-in, a bad CSRF token, too many
    sign-in attempts, a body too large, a value that does not parse, an id that does not
    exist, an action the database refuses): nothing changed, and the page says why. `status`
    is the page's HTTP status; `retry_after`, when set, the seconds to wait (429)."""

    def __init__(self, status: int, message: str, *, retry_after: int | None = None) -> None:
        self.status = status
        self.retry_after = retry_after
        super().__init__(message)

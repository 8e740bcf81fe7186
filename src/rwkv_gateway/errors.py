"""The GatewayError tree: domain errors raised below `api/` and rendered by each dialect.

Every failure the service can explain is one of these. Each dialect maps the class (and its
`code`) onto its own envelope; nothing below `api/` knows about HTTP.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base of every error the gateway reports to a client or operator."""

    code: str = "internal_error"
    #: Suggested HTTP status for dialects that use HTTP statuses.
    http_status: int = 500

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidParameter(GatewayError):
    """A request value is out of range or of the wrong kind."""

    code = "invalid_parameter"
    http_status = 400


class PromptTooLong(InvalidParameter):
    code = "prompt_too_long"


class NotFound(GatewayError):
    code = "not_found"
    http_status = 404


class Unauthorized(GatewayError):
    code = "unauthorized"
    http_status = 401


class Forbidden(GatewayError):
    code = "forbidden"
    http_status = 403


class ServerBusy(GatewayError):
    """The admission queue is full; the client should retry after `retry_after` seconds."""

    code = "server_busy"
    http_status = 503

    def __init__(self, message: str = "server is busy, retry later", *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class StorageUnavailable(ServerBusy):
    """The database cannot be reached or did not answer in time (docs/operations.md#health).

    A kind of "busy": every dialect already answers that with its own retryable envelope (OpenAI 503
    `overloaded`, Baidu 336100 with HTTP 200, role-play code 503, ChatGLM and the Task API 503, with
    Retry-After where the dialect has it), which is what a client should do about an outage: retry.
    """

    code = "storage_unavailable"

    def __init__(
        self, message: str = "database unavailable, retry later", *, retry_after: float = 5.0
    ) -> None:
        super().__init__(message, retry_after=retry_after)


class NotReady(GatewayError):
    """The model is not loaded yet, or the server is draining."""

    code = "not_ready"
    http_status = 503


class GenerationFailed(GatewayError):
    """The engine could not finish a request (the failure is confined to that request)."""

    code = "generation_failed"
    http_status = 500


class ModelLoadError(GatewayError):
    """The checkpoint could not be found, recognised or loaded with the given strategy."""

    code = "model_load_error"


class StateMismatch(GatewayError):
    """A state snapshot was made by another model (or is corrupt) and cannot be used."""

    code = "state_mismatch"
    http_status = 409


class ConfigError(GatewayError):
    code = "config_error"


class ModelNotFound(NotFound):
    """A request named a model this server does not serve."""

    code = "model_not_found"

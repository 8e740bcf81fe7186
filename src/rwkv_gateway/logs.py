"""Process logging: text or JSON lines on stderr, each record stamped with the current request id.

`configure_logging()` is called by the CLI's `serve` (never at import time). The request id lives in
a context variable that the HTTP middleware (`api/common/request_id.py`) sets for the duration of a
request, so every log line written while serving it, in any module, carries it without the caller
passing it along. Prompt and reply text never belong in a log line unless the operator turned on
the `log_prompts` setting; code that wants to log such text checks `settings.log_prompts` first.
Secrets in query strings (Baidu's `access_token`) are masked in uvicorn's access lines.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

#: The id of the HTTP request being served in this context (None outside a request). A ContextVar
#: must be created once at module level to be shared; creating it allocates nothing else.
request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("rwkv_request_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=` and is kept in JSON.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "request_id",
    "taskName",
    "color_message",  # uvicorn's copy of the message with ANSI colours
}


def current_request_id() -> str | None:
    return request_id_var.get()


class RequestIdFilter(logging.Filter):
    """Puts `request_id` on every record ("-" outside a request) so text formats can name it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get() or "-"
        return True


_SECRET_QUERY = re.compile(r"((?:^|[?&])(?:access_token|api_key|key)=)[^&\s]*", re.IGNORECASE)


class AccessLogRedactor(logging.Filter):
    """Masks credential query parameters in uvicorn access lines (their third argument is the path
    with its query string): a log file must not hand out working access tokens."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "=" in args[2]:
            record.args = (*args[:2], _SECRET_QUERY.sub(r"\1***", args[2]), *args[3:])
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC, ISO 8601), level, logger, message, request_id, plus any
    `extra=` fields and the formatted traceback (`exc_info`) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        request_id = getattr(record, "request_id", None)
        if request_id in (None, "-"):
            request_id = request_id_var.get()
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": request_id,
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key not in out:
                out[key] = value if isinstance(value, str | int | float | bool | None) else repr(value)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


class GatewayHandler(logging.StreamHandler[TextIO]):
    """The handler `configure_logging()` installs (its class tells a later call which one to replace)."""


def make_handler(fmt: Literal["text", "json"], stream: TextIO | None = None) -> logging.Handler:
    """A stream handler (stderr by default) in the given format, with the request-id filter."""
    handler = GatewayHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    return handler


def configure_logging(
    level: str, fmt: Literal["text", "json"] = "text", *, stream: TextIO | None = None
) -> None:
    """Route the root logger (and uvicorn's, which then propagate to it) to one handler.

    Replaces handlers a previous call installed, so calling it twice does not double every line.
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        if isinstance(old, GatewayHandler):
            root.removeHandler(old)
    root.addHandler(make_handler(fmt, stream))
    root.setLevel(level.upper())
    # uvicorn's loggers get no handlers of their own (the CLI passes log_config=None): they propagate
    # here, so access and error lines share the format and the request id.
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uv = logging.getLogger(name)
        uv.handlers.clear()
        uv.propagate = True
        uv.setLevel(logging.NOTSET)  # follow the root level, whatever an earlier uvicorn.Config set
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, AccessLogRedactor) for f in access.filters):
        access.addFilter(AccessLogRedactor())

"""Which database failures mean "the database is unavailable", as opposed to a bug or a constraint.

`SqlStorage` (db/session.py) turns these into the domain's `StorageUnavailable` at the storage
boundary, so every dialect renders an outage in its own retryable envelope instead of a 500, and
counts them by kind for `/metrics` (`rwkv_gateway_db_errors_total{kind}`).
"""

from __future__ import annotations

from sqlalchemy import exc as sa_exc


def outage_kind(error: BaseException) -> str | None:
    """The kind of outage `error` is (connect, disconnect, timeout, pool_timeout, operational), or None
    when it is something else (an integrity error, a programming error) that must not be hidden."""
    if isinstance(error, sa_exc.TimeoutError):
        return "pool_timeout"  # every pooled connection is busy (RWKV_GATEWAY_DB_POOL_TIMEOUT_S)
    if isinstance(error, sa_exc.DBAPIError):
        if error.connection_invalidated:
            return "disconnect"
        original = error.orig
        if isinstance(original, TimeoutError) or "timeout" in type(original).__name__.lower():
            return "timeout"
        # asyncpg's connection errors (server shut down, cannot connect now), refused sockets, SQLite's
        # "database is locked" past the busy timeout: all "retry later".
        if isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError):
            return "operational"
        cause = error.__cause__
        return outage_kind(cause) if cause is not None and cause is not error else None
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, OSError):
        return "connect"  # refused, unreachable, name not resolved
    name = type(error).__module__ + "." + type(error).__name__
    if name.startswith("asyncpg.") and ("Connection" in name or "CannotConnectNow" in name):
        return "disconnect"
    return None

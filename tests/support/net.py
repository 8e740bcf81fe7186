"""Ports for the servers tests start: a free one, or a fixed one once it is free."""

from __future__ import annotations

import socket
import time


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def wait_for_free_port(port: int, timeout_s: float, why: str) -> None:
    """Wait until `port` can be bound (another test run's server may still hold it), or fail the test
    with `why` after `timeout_s`: a test that needs a fixed port never skips silently."""
    deadline = time.monotonic() + timeout_s
    while not port_is_free(port):
        if time.monotonic() > deadline:
            raise AssertionError(f"port {port} stayed in use for {timeout_s:.0f}s; {why}")
        time.sleep(0.5)

"""Helpers the tests share, one of each: the in-process app (`support.app.running_app`), the live
server subprocess (`support.live.start_server` / `live_server`), ports, and waiting for an idle engine.

Fixtures stay in the conftest.py files; this package holds the plain functions they and the tests call.
`tests/` is on sys.path (pytest puts a conftest's directory there), so tests import `support`. The app
and live-server modules are imported by name, so a test that needs neither imports no web stack.
"""

from support.engine import idle, model_info
from support.net import free_port, port_is_free, wait_for_free_port

__all__ = ["free_port", "idle", "model_info", "port_is_free", "wait_for_free_port"]

"""Routes of this dialect (being built; registered by the composition root)."""

from __future__ import annotations

from fastapi import APIRouter

from rwkv_gateway.api.common.errors import ErrorRenderer

router = APIRouter()


def error_scopes() -> list[tuple[str, ErrorRenderer]]:
    """(path, renderer) pairs for errors raised outside this dialect's routes (404, 405, 500).

    A path ending in "/" is a prefix; any other path matches exactly. More specific entries first.
    """
    return []

"""Where role-play parameters come from and how they are coerced (docs/roleplay.md#2-parameters).

The reference merges the query string and a form body (urlencoded or multipart) into one lookup: a
key in both is taken from the query string, a repeated key by its first occurrence. Values are
coerced as Flask/Python would: text raw (untrimmed), floats by Python `float()` syntax falling back
to the default when unparsable (and, departing from the reference, when NaN or infinite), `log_index`
by `int()` syntax (else 0), `use_qa` true for any non-empty string. A JSON object body is accepted
too, with the typing rules given there.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")
_NO_STREAM = frozenset({"0", "false", "no", "off"})


class Params:
    """The merged parameters of one request."""

    def __init__(
        self,
        query: Mapping[str, str],
        form: Mapping[str, str | UploadFile],
        body: Mapping[str, Any],
    ) -> None:
        self._query = query
        self._form = form
        self._json = body

    def _raw(self, key: str) -> tuple[bool, Any]:
        """(found, value): the query string first, then the form, then the JSON object."""
        if key in self._query:
            return True, self._query[key]
        if key in self._form:
            return True, self._form[key]
        if key in self._json:
            return True, self._json[key]
        return False, None

    def text(self, key: str) -> str | None:
        """A text field: None when absent (or, in JSON, null/array/object), else the raw string."""
        found, value = self._raw(key)
        if not found or isinstance(value, UploadFile | bool):
            return None
        if isinstance(value, str):
            return value
        if isinstance(value, int):
            return str(value)
        if isinstance(value, float):
            return repr(value) if math.isfinite(value) else None
        return None

    def number(self, key: str) -> float | None:
        """A float field: None (the caller's default) when absent, unparsable, NaN or infinite."""
        found, value = self._raw(key)
        if not found or isinstance(value, bool):
            return None
        if isinstance(value, int | float):
            result = float(value)
        elif isinstance(value, str):
            try:
                result = float(value)
            except ValueError:
                return None
        else:
            return None
        return result if math.isfinite(result) else None

    def integer(self, key: str) -> int:
        """`log_index`: Python `int()` syntax, else 0; a JSON number only when integral."""
        found, value = self._raw(key)
        if not found or isinstance(value, bool):
            return 0
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            return int(value) if math.isfinite(value) and value.is_integer() else 0
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                return 0
        return 0

    def flag(self, key: str) -> bool:
        """`use_qa`: true for any non-empty string ("0" and "false" included), a JSON boolean as is."""
        found, value = self._raw(key)
        if not found:
            return False
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return value != ""
        return False

    def streaming(self) -> bool:
        """`stream`: absent or anything else streams; 0/false/no/off (any case) or JSON false do not."""
        found, value = self._raw("stream")
        if not found:
            return True
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return value.strip().lower() not in _NO_STREAM
        if isinstance(value, int | float):
            return value != 0
        return True

    async def aclose(self) -> None:
        """Close the uploaded files of a multipart body."""
        for value in self._form.values():
            if isinstance(value, UploadFile):
                await value.close()

    def upload(self, key: str) -> UploadFile | None:
        _, value = self._raw(key)
        return value if isinstance(value, UploadFile) else None


def _first(items: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in items:
        out.setdefault(key, value)
    return out


async def read_params(request: Request, *, max_part_bytes: int) -> Params:
    """Parse the query string and the body (form or JSON; anything else is ignored)."""
    query = _first(list(request.query_params.multi_items()))
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    form: dict[str, Any] = {}
    body: dict[str, Any] = {}
    if content_type in _FORM_TYPES:
        data = await request.form(max_part_size=max_part_bytes)
        items = list(data.multi_items())
        form = _first(items)
        # Repeated file fields that lose to their first occurrence are closed at once.
        for key, value in items:
            if isinstance(value, UploadFile) and form.get(key) is not value:
                await value.close()
    elif content_type == "application/json" or content_type.endswith("+json"):
        raw = await request.body()
        try:
            parsed = json.loads(raw) if raw.strip() else None
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            parsed = None
        if isinstance(parsed, dict):
            body = parsed
    else:
        await request.body()  # read (and size-check) whatever came, then ignore it as the reference does
    return Params(query, form, body)

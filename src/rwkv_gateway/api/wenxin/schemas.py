"""The wenxinworkshop chat request: its wire model and the checks that give each violation Baidu's code.

Bodies are parsed here rather than by FastAPI because the code depends on which check failed, in
Baidu's order: not JSON -> 336002; not an object, `messages` missing or not a list -> 336001; message
structure (odd count, user/assistant alternation) -> 336006; an empty or non-string content, or a field
out of range -> 336003 with `"<field> is invalid: <reason>"`; too much content -> 336103. Unknown fields
are ignored (qianfan copies every extra keyword argument into the body, and always sends
`extra_parameters`). Types are strict: `"stream": "true"` or `"temperature": "0.5"` are errors.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rwkv_gateway.api.wenxin.errors import (
    INVALID_ARGUMENT,
    INVALID_JSON,
    MESSAGES,
    MESSAGES_ERROR,
    PROMPT_TOO_LONG,
    WenxinError,
    parameter_error,
)

#: Baidu's documented limits on `stop` and `metadata`.
MAX_STOP = 4
MAX_STOP_CHARS = 20
MAX_METADATA = 16


class WenxinMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    role: Literal["user", "assistant", "function"]
    content: str
    #: Sent with `function` messages; not used by this model.
    name: str | None = None


class WenxinChatRequest(BaseModel):
    """`POST /rpc/2.0/ai_custom/v1/wenxinworkshop/chat/{api_name}`. None means "Baidu's default"."""

    model_config = ConfigDict(extra="ignore", strict=True)

    messages: list[WenxinMessage]
    stream: bool = False
    temperature: float | None = Field(default=None, gt=0.0, le=1.0)
    #: Baidu asks for a positive integer; 0 is also accepted, meaning "no top-k filter".
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    penalty_score: float | None = Field(default=None, ge=1.0, le=2.0)
    stop: list[str] | None = Field(default=None, max_length=MAX_STOP)
    user_id: str | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=MAX_METADATA)
    #: ERNIE extensions.
    system: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    #: ERNIE's `"json_object"` holds `result` to one JSON object (docs/wenxin.md#9-json-output).
    response_format: Literal["text", "json_object"] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_items(cls, value: list[str] | None) -> list[str] | None:
        for item in value or ():
            if not item:
                raise ValueError("stop strings must not be empty")
            if len(item) > MAX_STOP_CHARS:
                raise ValueError(f"each stop string is at most {MAX_STOP_CHARS} characters")
        return value


def _field_name(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def _check_messages(raw: Any) -> None:
    """The structure checks that come before field ranges (codes 336001, 336006, 336003)."""
    if not isinstance(raw, list):
        raise WenxinError(INVALID_ARGUMENT, f"{MESSAGES[INVALID_ARGUMENT]}: messages must be a list")
    if len(raw) % 2 == 0:
        what = "messages is empty" if not raw else f"messages has {len(raw)} entries"
        raise WenxinError(MESSAGES_ERROR, f"the length of messages must be an odd number ({what})")
    for index, message in enumerate(raw):
        field = f"messages[{index}]"
        if not isinstance(message, dict):
            raise parameter_error(field, "a message must be an object with role and content")
        role = message.get("role")
        if index % 2 == 0 and role not in ("user", "function"):
            raise WenxinError(
                MESSAGES_ERROR,
                f"the role of message with even index in the messages must be user or function "
                f"({field}.role is {role!r})",
            )
        if index % 2 == 1 and role != "assistant":
            raise WenxinError(
                MESSAGES_ERROR,
                f"the role of message with odd index in the messages must be assistant "
                f"({field}.role is {role!r})",
            )
        content = message.get("content")
        if not isinstance(content, str):
            raise parameter_error(f"{field}.content", "content must be a string")
        if not content.strip():
            raise parameter_error(f"{field}.content", "message content can not be empty")


def parse_chat_request(body: bytes, *, max_content_chars: int) -> WenxinChatRequest:
    """The request in `body`, or the WenxinError for the first rule it breaks."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise WenxinError(INVALID_JSON, f"{MESSAGES[INVALID_JSON]}: the body is not valid JSON") from None
    if not isinstance(payload, dict):
        raise WenxinError(INVALID_ARGUMENT, f"{MESSAGES[INVALID_ARGUMENT]}: the body must be a JSON object")
    if "messages" not in payload:
        raise WenxinError(INVALID_ARGUMENT, f"{MESSAGES[INVALID_ARGUMENT]}: messages is required")
    _check_messages(payload["messages"])
    try:
        req = WenxinChatRequest.model_validate(payload)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise parameter_error(_field_name(tuple(err["loc"])), str(err["msg"])) from None
    chars = sum(len(m.content) for m in req.messages) + len(req.system or "")
    if chars > max_content_chars:
        raise WenxinError(
            PROMPT_TOO_LONG,
            f"{MESSAGES[PROMPT_TOO_LONG]}: messages (with system) hold {chars} characters; "
            f"the limit is {max_content_chars}",
            param="messages",
        )
    return req

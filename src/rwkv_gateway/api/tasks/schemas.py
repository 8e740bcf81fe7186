"""Wire schemas of the RWKV-Server Task API: request bodies and the TaskResponse
(docs/tasks.md#3-request-bodies, docs/tasks.md#2-ids-results-and-status).

The reference validates bodies with `extra="forbid"` and `strict=True`, so do we: unknown fields, a
string where a number belongs and a bool where an int belongs are 422s in FastAPI's detail shape
(an int is still fine for a float field). Ranges are inclusive. One deliberate departure: `seed` is
accepted on fork and continue (the SDK sends it when asked; the reference rejects it).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

#: Largest max_tokens the reference accepts.
MAX_TOKENS_LIMIT = 40960

#: Prompt text or token ids.
Prompt = str | list[int]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class TaskCreateRequest(_Strict):
    """`POST /v1/tasks/tmp` and `/v1/tasks/create`."""

    prompt: Prompt
    max_tokens: int = Field(default=4096, ge=0, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_k: int = Field(default=50, ge=-1, le=100)
    top_p: float = Field(default=0.3, ge=0.0, le=1.0)
    presence_penalty: float = Field(default=2.0, ge=0.0, le=10.0)
    repetition_penalty: float = Field(default=0.0, ge=0.0, le=10.0)
    penalty_decay: float = Field(default=1.0, ge=0.0, le=1.0)
    stream: bool = False
    seed: int | None = None
    #: Structured output for this generation (docs/tasks.md#8-structured-output): OpenAI's
    #: `response_format` object, or a raw grammar.
    response_format: dict[str, Any] | None = None
    grammar: str | None = None


class TaskFimRequest(_Strict):
    """`POST /v1/tasks/fim`: fill in the middle between `prefix` and `suffix`."""

    prefix: str
    suffix: str = ""
    max_tokens: int = Field(default=4096, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_k: int = Field(default=50, ge=-1, le=100)
    top_p: float = Field(default=0.3, ge=0.0, le=1.0)
    presence_penalty: float = Field(default=2.0, ge=0.0, le=10.0)
    repetition_penalty: float = Field(default=0.0, ge=0.0, le=10.0)
    penalty_decay: float = Field(default=1.0, ge=0.0, le=1.0)
    stream: bool = False
    seed: int | None = None

    def prompt_text(self) -> str:
        """The FIM prompt as the reference builds it (suffix first, then the prefix to continue)."""
        return "✿prefix✿✿suffix✿" + self.suffix + "✿middle✿" + self.prefix


class TaskContinueRequest(_Strict):
    """`POST /v1/tasks/{id}/fork` and `/continue`: every field optional; given ones replace the task's."""

    prompt: Prompt | None = None
    max_tokens: int | None = Field(default=None, ge=0, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_k: int | None = Field(default=None, ge=0, le=100)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(default=None, ge=0.0, le=10.0)
    repetition_penalty: float | None = Field(default=None, ge=0.0, le=10.0)
    penalty_decay: float | None = Field(default=None, ge=0.0, le=1.0)
    stream: bool = False
    seed: int | None = None
    #: For this generation only; not kept with the task (docs/tasks.md#8-structured-output).
    response_format: dict[str, Any] | None = None
    grammar: str | None = None

    def overrides(self) -> dict[str, Any]:
        """The generation parameters the client set (None means "keep the task's value")."""
        return self.model_dump(exclude={"prompt", "stream", "response_format", "grammar"}, exclude_none=True)


class TaskResponse(BaseModel):
    """What create, fim, get_result, fork, continue and as_template return."""

    task_id: str
    result: str
    prefill_time: float
    gen_time: float
    speed: float
    finished: bool


class TaskStatusResponse(BaseModel):
    task_id: str
    generated_buf: int
    status: int


class TaskListResponse(BaseModel):
    cpu_cache_count: int
    database_count: int
    total_count: int
    cpu_tasks: list[str]
    db_tasks: list[str]

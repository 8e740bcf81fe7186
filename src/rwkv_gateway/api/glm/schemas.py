"""Wire bodies of the ChatGLM-style API (docs/glm.md), read the reference's lenient way.

Unknown fields are ignored and a field sent as `null` takes its default, as in the reference (which
reads the JSON dict with `.get(key, default)`). Types are strict, though: a number sent as a string
or a boolean is a 400 naming the field, not a silent coercion.
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data


class GLMChatRequest(_Lenient):
    """`/chat` and `/chat-stream`. `prompt` is required (`""` is allowed, as in the reference)."""

    prompt: str = Field(description="the current user message")
    history: list[list[str]] = Field(
        default_factory=list,
        description='past turns: [["q1", "a1"], ["q2", "a2"]] or flattened [["q1", "a1", "q2", "a2"]]',
    )
    max_length: int = Field(
        default=4096, description="total tokens: formatted prompt (history included) plus the reply"
    )
    top_p: float = Field(default=0.7, description="nucleus sampling, in [0, 1]")
    temperature: float = Field(default=0.95, description="sampling temperature; 0 is greedy")

    @field_validator("max_length")
    @classmethod
    def _positive_length(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be a positive number of tokens, got {value}")
        return value

    @field_validator("top_p", "temperature")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number, got {value}")
        return value

    @field_validator("top_p")
    @classmethod
    def _unit_interval(cls, value: float) -> float:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"must be in [0, 1], got {value}")
        return value

    @field_validator("temperature")
    @classmethod
    def _not_negative(cls, value: float) -> float:
        if value < 0:
            raise ValueError(f"must be >= 0, got {value}")
        return value


class GLMTokenizeRequest(_Lenient):
    """The GLM shape of `/tokenize`: the prompt's token ids, truncated to `max_length`."""

    prompt: str
    max_length: int = 4096

    @field_validator("max_length")
    @classmethod
    def _positive_length(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be a positive number of tokens, got {value}")
        return value


class GLMEmbeddingRequest(_Lenient):
    """`/embedding`: a list of texts (one vector each) or one text (one flat vector)."""

    prompt: list[str] | str = Field(default_factory=list)

    @field_validator("prompt", mode="plain")
    @classmethod
    def _texts(cls, value: Any) -> list[str] | str:
        # Checked by hand: a union's validation errors would name its branches, not the bad item.
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError("expected a string or a list of strings")
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise ValueError(f"item {index} is not a string")
        return value

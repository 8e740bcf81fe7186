"""OpenAI wire schemas (requests only; responses are built as plain dicts in the exact upstream shape).

Unknown fields are ignored, as the SDKs and front ends send many. Range checks follow the OpenAI API
(temperature [0, 2], top_p [0, 1], penalties [-2, 2], at most 4 stop strings) plus the extensions that
RWKV and SillyTavern clients send (top_k, min_p, repetition_penalty, penalty_decay, Mirostat).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

NonNegInt = Annotated[int, Field(ge=0)]
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high"]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Wire):
    include_usage: bool = False


class ContentPart(_Wire):
    type: str
    text: str | None = None


class FunctionCallIn(_Wire):
    name: str
    #: JSON text, as OpenAI sends it back (an object is accepted too).
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Wire):
    """A call an earlier assistant turn made, sent back as history (docs/openai.md#tools)."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(_Wire):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        texts: list[str] = []
        for part in self.content:
            if part.type not in ("text", "input_text"):
                raise ValueError(f"content parts of type {part.type!r} are not supported (text only)")
            texts.append(part.text or "")
        return "".join(texts)


class SamplingFields(_Wire):
    """Fields shared by chat and text completions."""

    model: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Extensions used by RWKV tools and SillyTavern
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    penalty_decay: float | None = Field(default=None, ge=0.0, le=1.0)
    mirostat_mode: int | None = Field(default=None, ge=0, le=2)
    mirostat_tau: float | None = Field(default=None, gt=0.0, le=50.0)
    mirostat_eta: float | None = Field(default=None, gt=0.0, le=1.0)
    # Structured output (docs/openai.md#structured-output); checked by `structured.output_constraint`
    # so that a bad value is a 400 naming the field.
    response_format: Any = None
    #: A raw grammar in the engine's syntax; vLLM's `guided_grammar` is the same thing.
    grammar: str | None = None
    guided_grammar: str | None = None
    #: vLLM's guided decoding by JSON Schema (an object or JSON text).
    guided_json: Any = None
    #: vLLM fields we do not serve: given, they are a 400 rather than silently ignored.
    guided_choice: Any = None
    guided_regex: Any = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys must be token ids, got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}")
        return value

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    #: Checked by `tools.tool_use` (docs/openai.md#tools).
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    #: The legacy function-calling fields: a 400 pointing to `tools` rather than silently ignored.
    functions: Any = None
    function_call: Any = None
    #: G-series think mode (docs/openai.md#reasoning); World models accept it and ignore it.
    reasoning_effort: ReasoningEffort | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]] = ""
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=5)


class EmbeddingRequest(_Wire):
    input: str | list[str] | list[int] | list[list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None


class TokenizeRequest(_Wire):
    """vLLM-style /tokenize: a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessageIn] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(_Wire):
    model: str | None = None
    tokens: list[NonNegInt]

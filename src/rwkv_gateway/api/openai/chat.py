"""OpenAI chat completions: messages -> the chat template's prompt, and the reply -> `message` /
`delta` with `reasoning_content` (G series, docs/openai.md#reasoning), `content` and `tool_calls`
(docs/openai.md#tools).

A reply is split twice, chunk by chunk: the think block first (domain/reasoning.py), then, when tools
are offered, the answer into text and calls (domain/tool_calls.py), so the chunks of a stream add up to
exactly what the whole reply gives.
"""

from __future__ import annotations

import secrets
from dataclasses import replace
from typing import Any

from rwkv_gateway.api.openai.schemas import ChatCompletionRequest
from rwkv_gateway.api.openai.serving import (
    Admitted,
    Completion,
    admit,
    check_max_tokens,
    finish_reason,
    sampling_params,
)
from rwkv_gateway.api.openai.structured import output_constraint
from rwkv_gateway.api.openai.tools import ToolUse, chat_messages, tool_use
from rwkv_gateway.domain.engine import Engine
from rwkv_gateway.domain.prompts import ChatTemplate, ThinkMode, chat_template
from rwkv_gateway.domain.reasoning import (
    ReplyFollowup,
    ThinkSplitter,
    constraint_after_think,
    history_followup,
)
from rwkv_gateway.domain.tool_calls import (
    ArgumentsDelta,
    CallEvent,
    CallOpened,
    ContentDelta,
    ToolCallSplitter,
    render_reply,
    split_calls,
)
from rwkv_gateway.domain.types import Finish, GenerationRequest, TextDelta
from rwkv_gateway.errors import InvalidParameter
from rwkv_gateway.settings import Settings

#: OpenAI reasoning_effort -> G-series think mode (docs/openai.md#reasoning).
THINK_BY_EFFORT: dict[str | None, ThinkMode] = {
    None: "off",
    "none": "fake",
    "minimal": "fake",
    "low": "short",
    "medium": "think",
    "high": "long",
}


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


class _Reply:
    """One choice's reply as it streams: think split, then (with tools) the content/calls split."""

    def __init__(self, think: ThinkMode, tools: bool) -> None:
        self.think = ThinkSplitter(think)
        self.calls = ToolCallSplitter() if tools else None
        self.call_ids: list[str] = []

    def push(self, text: str, n_tokens: int) -> dict[str, Any]:
        return self._delta(*self.think.push(text, n_tokens))

    def finish(self) -> dict[str, Any]:
        delta = self._delta(*self.think.finish())
        if self.calls is not None:
            self._merge(delta, self.calls.finish())
        return delta

    def _delta(self, reasoning: str, content: str) -> dict[str, Any]:
        delta: dict[str, Any] = {"reasoning_content": reasoning} if reasoning else {}
        if self.calls is None:
            if content:
                delta["content"] = content
        elif content:
            self._merge(delta, self.calls.push(content))
        return delta

    def _merge(self, delta: dict[str, Any], events: list[CallEvent]) -> None:
        """Events -> `content` and `tool_calls` of one delta (one entry per call, as the SDKs merge)."""
        entries: dict[int, dict[str, Any]] = {}
        for event in events:
            if isinstance(event, ContentDelta):
                delta["content"] = delta.get("content", "") + event.text
            elif isinstance(event, CallOpened):
                self.call_ids.append(new_call_id())
                entries[event.index] = {
                    "index": event.index,
                    "id": self.call_ids[event.index],
                    "type": "function",
                    "function": {"name": event.name, "arguments": ""},
                }
            elif isinstance(event, ArgumentsDelta):
                entry = entries.setdefault(event.index, {"index": event.index, "function": {"arguments": ""}})
                entry["function"]["arguments"] += event.text
        if entries:
            delta["tool_calls"] = list(entries.values())

    @property
    def called(self) -> bool:
        return self.calls is not None and bool(self.calls.calls)

    def message(self) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": self.think.content}
        if self.think.thinking:
            message["reasoning_content"] = self.think.reasoning
        if self.calls is not None:
            message["content"] = self.calls.content or None
            if self.calls.calls:
                message["tool_calls"] = [
                    {"id": cid, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for cid, c in zip(self.call_ids, self.calls.calls, strict=True)
                ]
        message["refusal"] = None
        return message


def reply_followup(template: ChatTemplate, think: ThinkMode, tools: bool) -> tuple[ReplyFollowup, int]:
    """How the reply comes back as history (`GenerationRequest.reply_followup`) and how many prompt
    pieces that replaces: the answer without its think block
    (docs/chat-prompts.md#7-resent-history-after-thinking), and with tools its content, then its calls
    in their history form (docs/openai.md#tools)."""
    return history_followup(template, think, _calls_history if tools else None)


def _calls_history(answer: str) -> str:
    """An answer with calls as the client sends it back: its content, then the calls' history form."""
    return render_reply(*split_calls(answer))


class ChatCompletion(Completion):
    object_name = "chat.completion"
    chunk_object = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, engine: Engine, settings: Settings, req: ChatCompletionRequest) -> None:
        super().__init__(engine, settings, req)
        self.req = req
        self.template = chat_template(settings, engine.info)
        effort = req.reasoning_effort or settings.default_reasoning_effort
        self.think = self.template.think_mode(THINK_BY_EFFORT[effort])  # "off" on World models
        self.tools: ToolUse = tool_use(req)
        self.constraint = output_constraint(req)
        if self.tools.choice == "auto" and self.constraint is not None:
            raise InvalidParameter(
                "response_format (or a grammar) cannot be combined with tools under tool_choice 'auto': "
                "use tool_choice 'none' or 'required'",
                param="response_format",
            )
        self._replies = [_Reply(self.think, self.tools.active) for _ in range(req.n)]

    def engine_request(self) -> GenerationRequest:
        req, settings, template = self.req, self.settings, self.template
        limit = req.max_completion_tokens or req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"
        max_tokens = check_max_tokens(limit, settings, param) if limit else settings.default_max_tokens
        messages = chat_messages(req.messages, self.tools.prompt_block)
        # Calls forced by tool_choice replace any response_format (the reply has no content).
        constraint = self.tools.constraint or self.constraint or self.tools.text_constraint
        if constraint is not None and constraint.kind != "grammar":
            # After "Assistant:" an RWKV model starts with a space-led token; the reply is trimmed.
            constraint = replace(constraint, leading_space=True)
        if constraint is not None and self.think != "off":
            # G series: the think block comes first, free; then the constrained answer.
            constraint = replace(constraint, think=constraint_after_think(self.think))
        # n > 1: which of the choices would the client send back?
        followup, replaces = (
            reply_followup(template, self.think, self.tools.active) if req.n == 1 else (None, 0)
        )
        return GenerationRequest(
            # Turn by turn, so a conversation that resends its history continues from cached states.
            prompt_segments=template.segments(messages, think=self.think),
            reply_followup=followup,
            reply_followup_replaces=replaces,
            sampling=sampling_params(req, self.engine.info.vocab_size),
            constraint=constraint,
            max_tokens=max_tokens,
            stop=(*template.stops, *req.stop_list()),
            dialect="openai",
            user=req.user,
        )

    async def admit(self, api_key_id: str | None) -> Admitted:
        base = self.engine_request()
        base.api_key_id = api_key_id
        return await admit(self.engine, base, self.req.n)

    def _absorb(self, index: int, delta: TextDelta) -> None:
        self._replies[index].push(delta.text, len(delta.token_ids))

    def _reasoning_tokens(self) -> int:
        return sum(r.think.reasoning_tokens for r in self._replies)

    def _choice(self, index: int, _text: str, finish: Finish) -> dict[str, Any]:
        reply = self._replies[index]
        reply.finish()
        return {
            "index": index,
            "message": reply.message(),
            "logprobs": None,
            "finish_reason": finish_reason(finish, reply.called),
        }

    def _opening(self, index: int) -> dict[str, Any]:
        # With tools the content may never come (a reply of calls): it starts as null, as OpenAI's does.
        delta = {"role": "assistant", "content": None if self.tools.active else ""}
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}

    def _chunk_choice(self, index: int, delta: dict[str, Any]) -> dict[str, Any] | None:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": None} if delta else None

    def _delta(self, index: int, delta: TextDelta) -> dict[str, Any] | None:
        # Streams are split and trimmed like the whole reply, so both give the same texts.
        return self._chunk_choice(index, self._replies[index].push(delta.text, len(delta.token_ids)))

    def _closing(self, index: int, finish: Finish) -> list[dict[str, Any]]:
        reply = self._replies[index]
        held = self._chunk_choice(index, reply.finish())
        reason = finish_reason(finish, reply.called)
        last = {"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}
        return [held, last] if held is not None else [last]

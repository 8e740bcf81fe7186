"""Chat messages -> RWKV prompt text, the implicit stop sequences, and reply trimming.

RWKV World / G1 models are trained on turns written as `"{Label}: {content}\\n\\n"`, so a blank line is
a turn boundary: message content is normalised (CRLF -> LF, trimmed, runs of blank lines collapsed to
one newline by default) and the prompt ends with `"Assistant:"`. Generation stops at the next
`"\\n\\nUser:"` / `"\\n\\nSystem:"`. Shared by every chat-shaped dialect (OpenAI, wenxinworkshop, GLM),
which all build their template with `chat_template(settings)` (docs/chat-prompts.md#1-turns).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rwkv_gateway.settings import Settings

_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    """How chat turns are written. The defaults are the RWKV World / G1 conventions."""

    system_label: str = "System"
    user_label: str = "User"
    assistant_label: str = "Assistant"
    #: Collapse blank lines inside a message so that "\n\n" only ever separates turns.
    collapse_blank_lines: bool = True
    #: Also stop at a bare blank line (for models that never write blank lines inside a reply).
    stop_on_blank_line: bool = False

    def label(self, role: str) -> str:
        if role in ("system", "developer"):
            return self.system_label
        if role == "assistant":
            return self.assistant_label
        # user, and the tool / function results some clients send, are read by the model as user turns
        return self.user_label

    def normalize(self, content: str) -> str:
        text = content.replace("\r\n", "\n").replace("\r", "\n").strip()
        if self.collapse_blank_lines:
            text = _BLANK_LINES.sub("\n", text)
        return text

    def segments(
        self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True
    ) -> tuple[str, ...]:
        """The prompt for `messages` in pieces; every system message is kept, in order.

        An assistant turn is two pieces, `"Assistant:"` and `" {reply}\n\n"`, because that is how a
        reply comes back in the next request: the engine can then cache the state after the reply
        (see `assistant_followup`) and the next turn prefills only its new messages.
        """
        parts: list[str] = []
        for m in messages:
            label = self.label(m.role)
            if label == self.assistant_label:
                parts += [f"{label}:", self.assistant_followup(m.content)]
            else:
                parts.append(f"{label}: {self.normalize(m.content)}\n\n")
        if add_generation_prompt:
            parts.append(f"{self.assistant_label}:")
        return tuple(parts)

    def assistant_followup(self, reply: str) -> str:
        """The piece that follows `"Assistant:"` when `reply` is sent back as history."""
        return f" {self.normalize(reply)}\n\n"

    def render(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True) -> str:
        """The prompt for `messages` as one string."""
        return "".join(self.segments(messages, add_generation_prompt=add_generation_prompt))

    @property
    def stops(self) -> tuple[str, ...]:
        stops = (f"\n\n{self.user_label}:", f"\n\n{self.system_label}:")
        return (*stops, "\n\n") if self.stop_on_blank_line else stops


def chat_template(settings: Settings) -> ChatTemplate:
    """The one template of every chat dialect, from the `RWKV_GATEWAY_CHAT_*` settings, so that a
    conversation gives the same prompt, stops and cached states whichever API it arrives through."""
    return ChatTemplate(
        system_label=settings.chat_system_label,
        user_label=settings.chat_user_label,
        assistant_label=settings.chat_assistant_label,
        collapse_blank_lines=settings.chat_collapse_blank_lines,
        stop_on_blank_line=settings.chat_stop_on_blank_line,
    )


class ReplyTrimmer:
    """Trims a streamed reply exactly as `str.strip()` trims the whole one.

    Leading whitespace is dropped; trailing whitespace is held back until something else follows it,
    so the concatenated stream equals the stripped non-streamed reply.
    """

    def __init__(self) -> None:
        self._started = False
        self._held = ""

    def push(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        text = self._held + text
        body = text.rstrip()
        self._held = text[len(body) :]
        return body

    def flush(self) -> str:
        """End of reply: the held trailing whitespace is dropped."""
        self._held = ""
        return ""

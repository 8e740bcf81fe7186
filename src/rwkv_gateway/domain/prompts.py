"""Chat messages -> RWKV prompt text, the implicit stop sequences, and reply trimming.

RWKV World / G1 models are trained on turns written as `"{Label}: {content}\\n\\n"`, so a blank line is
a turn boundary: message content is normalised (CRLF -> LF, trimmed, runs of blank lines collapsed to
one newline by default) and the prompt ends with `"Assistant:"`. Generation stops at the next
`"\\n\\nUser:"` / `"\\n\\nSystem:"`. Shared by every chat-shaped dialect (OpenAI, wenxinworkshop, GLM),
which all build their template with `chat_template(settings, model)` (docs/chat-prompts.md#1-turns).
G-series models (`rwkv7-g*` checkpoints) keep the turns and add think modes, chosen by how the assistant
turn opens (docs/chat-prompts.md#5-g-series-think-modes).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from rwkv_gateway.domain.engine import ModelInfo
    from rwkv_gateway.settings import Settings

_BLANK_LINES = re.compile(r"\n(?:[ \t]*\n)+")
_DATE = re.compile(r"(?<!\d)(20\d{6})(?!\d)")

TemplateName = Literal["world", "g-series"]
#: off: a plain answer; fake: the think block opened and closed by the prompt (fast answers from a
#: reasoning model); short / think / long: the model reasons first, for a bit, normally, or a lot.
ThinkMode = Literal["off", "fake", "short", "think", "long"]
#: G-series checkpoints dated this day or later take the think length as a suffix of the user's message.
THINK_SUFFIX_SINCE = "20250922"
_THINK_SUFFIX: dict[str, str] = {"short": " think a bit", "think": " think", "long": " think a lot"}


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
    #: "g-series" honours think modes; "world" writes every assistant turn the plain way.
    name: TemplateName = "world"
    #: G-series models dated 2025-09-22 or later: the think length is a suffix of the user's message.
    think_suffixes: bool = False

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

    def think_mode(self, think: ThinkMode) -> ThinkMode:
        """The mode actually used: World templates have no think modes."""
        return think if self.name == "g-series" else "off"

    def segments(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool = True,
        think: ThinkMode = "off",
    ) -> tuple[str, ...]:
        """The prompt for `messages` in pieces; every system message is kept, in order.

        An assistant turn is two pieces, `"Assistant:"` and `" {reply}\n\n"`, because that is how a
        reply comes back in the next request: the engine can then cache the state after the reply
        (see `assistant_followup`) and the next turn prefills only its new messages. `think` (G series
        only) picks the opening of the new assistant turn and, for models that take one, the length
        suffix of the last message when that is a user turn.
        """
        think = self.think_mode(think)
        suffix = _THINK_SUFFIX.get(think, "") if self.think_suffixes and add_generation_prompt else ""
        parts: list[str] = []
        for i, m in enumerate(messages):
            label = self.label(m.role)
            if label == self.assistant_label:
                parts += [f"{label}:", self.assistant_followup(m.content)]
            else:
                tail = suffix if i == len(messages) - 1 and label == self.user_label else ""
                parts.append(f"{label}: {self.normalize(m.content)}{tail}\n\n")
        if add_generation_prompt:
            parts.append(self.generation_prompt(think))
        return tuple(parts)

    def generation_prompt(self, think: ThinkMode = "off") -> str:
        """How the new assistant turn opens: `"Assistant:"`, or inside a think block (G series)."""
        think = self.think_mode(think)
        if think == "off":
            return f"{self.assistant_label}:"
        if think == "fake":
            return f"{self.assistant_label}: <think>\n</think"
        return f"{self.assistant_label}: <think"

    def assistant_followup(self, reply: str) -> str:
        """The piece that follows `"Assistant:"` when `reply` is sent back as history."""
        return f" {self.normalize(reply)}\n\n"

    def render(
        self,
        messages: Sequence[ChatMessage],
        *,
        add_generation_prompt: bool = True,
        think: ThinkMode = "off",
    ) -> str:
        """The prompt for `messages` as one string."""
        return "".join(self.segments(messages, add_generation_prompt=add_generation_prompt, think=think))

    @property
    def stops(self) -> tuple[str, ...]:
        stops = (f"\n\n{self.user_label}:", f"\n\n{self.system_label}:")
        return (*stops, "\n\n") if self.stop_on_blank_line else stops


def template_for_model(choice: str, model_path: str) -> tuple[TemplateName, bool]:
    """The template name and whether think suffixes apply, for a checkpoint file.

    `choice` is the setting: "auto" picks the G series for file names starting `rwkv7-g`
    (`rwkv7-g1a-0.4b-20250905-ctx4096.pth`), World otherwise. Think suffixes need a G-series model
    whose file name carries a date (YYYYMMDD) on or after 2025-09-22.
    """
    filename = PurePath(model_path).name.lower()
    if choice == "auto":
        name: TemplateName = "g-series" if filename.startswith("rwkv7-g") else "world"
    else:
        name = "g-series" if choice == "g-series" else "world"
    date = _DATE.search(filename)
    suffixes = name == "g-series" and date is not None and date.group(1) >= THINK_SUFFIX_SINCE
    return name, suffixes


def chat_template(settings: Settings, model: ModelInfo) -> ChatTemplate:
    """The one template of every chat dialect, from the `RWKV_GATEWAY_CHAT_*` settings and the served
    model, so that a conversation gives the same prompt, stops and cached states whichever API it
    arrives through."""
    name, suffixes = template_for_model(settings.chat_template, model.path)
    return ChatTemplate(
        system_label=settings.chat_system_label,
        user_label=settings.chat_user_label,
        assistant_label=settings.chat_assistant_label,
        collapse_blank_lines=settings.chat_collapse_blank_lines,
        stop_on_blank_line=settings.chat_stop_on_blank_line,
        name=name,
        think_suffixes=suffixes,
    )


def partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could still grow into `tag`: a streamed reply holds
    that much back until the next chunk says whether the tag came (`</think>`, `<tool_call>`)."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


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

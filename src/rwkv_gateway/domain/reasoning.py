"""A G-series reply -> its reasoning and its answer, chunk by chunk
(docs/chat-prompts.md#6-reasoning-and-answer).

In the think modes the prompt ends inside the think block (`"Assistant: <think"`), so the model first
writes `>` (finishing the tag), then its reasoning, then `</think>`, then the answer. In fake think
the prompt closed the block itself (`"...</think"`): the model writes the final `>`, then the answer.
`ThinkSplitter` turns the streamed text into (reasoning, content) deltas whatever the chunk boundaries,
so the deltas of a stream add up to exactly what the whole reply gives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from rwkv_gateway.domain.prompts import ChatTemplate, ReplyTrimmer, ThinkMode, partial_tag

CLOSE_TAG = "</think>"
THINKING: frozenset[ThinkMode] = frozenset({"short", "think", "long"})


class ThinkSplitter:
    """Splits one reply into reasoning and content.

    - Thinking modes: everything before the first `</think>` is reasoning, less one leading `>` and
      surrounding whitespace; everything after it is content, less surrounding whitespace. A reply that
      never closes the block (cut by max_tokens) is all reasoning, with empty content.
    - Fake think: everything is content, less one leading `>` and surrounding whitespace.
    - Off: everything is content, less surrounding whitespace (the plain chat reply).

    Text that might be the start of `</think>` is held until the next chunk decides, and trailing
    whitespace until something follows it. `reasoning_tokens` counts the tokens of the chunks that
    arrived while the block was open (the one that closes it included).
    """

    def __init__(self, think: ThinkMode) -> None:
        self.thinking = think in THINKING
        self._in_block = self.thinking
        self._drop_gt = think != "off"
        self._held = ""
        self._reasoning = ReplyTrimmer()
        self._content = ReplyTrimmer()
        self.reasoning = ""
        self.content = ""
        self.reasoning_tokens = 0

    def push(self, text: str, n_tokens: int = 0) -> tuple[str, str]:
        """The next chunk of the reply -> the (reasoning, content) text it releases."""
        if self._in_block:
            self.reasoning_tokens += n_tokens
        text = self._held + text
        self._held = ""
        if self._drop_gt:
            if not text:
                return "", ""
            self._drop_gt = False
            if text.startswith(">"):
                text = text[1:]
        if not self._in_block:
            return self._emit("", text)
        end = text.find(CLOSE_TAG)
        if end >= 0:
            self._in_block = False
            return self._emit(text[:end], text[end + len(CLOSE_TAG) :], closed=True)
        keep = partial_tag(text, CLOSE_TAG)
        self._held = text[len(text) - keep :]
        return self._emit(text[: len(text) - keep], "")

    def finish(self) -> tuple[str, str]:
        """End of the reply: held text that never became `</think>` is reasoning after all."""
        held, self._held = self._held, ""
        out = self._emit(held, "") if held else ("", "")
        self._reasoning.flush()
        self._content.flush()
        return out

    def _emit(self, reasoning: str, content: str, *, closed: bool = False) -> tuple[str, str]:
        r = self._reasoning.push(reasoning) if reasoning else ""
        if closed:
            self._reasoning.flush()  # whitespace before </think> is not part of the reasoning
        c = self._content.push(content) if content else ""
        self.reasoning += r
        self.content += c
        return r, c


def split_reply(text: str, think: ThinkMode) -> tuple[str, str]:
    """The (reasoning, content) of a whole reply."""
    splitter = ThinkSplitter(think)
    splitter.push(text)
    splitter.finish()
    return splitter.reasoning, splitter.content


ReplyFollowup = Callable[[str], str | tuple[str, ...]]


def history_followup(
    template: ChatTemplate, think: ThinkMode, history_form: Callable[[str], str] | None = None
) -> tuple[ReplyFollowup, int]:
    """How a reply comes back as the next turn's history, and how many of the prompt's last pieces
    that replaces (`GenerationRequest.reply_followup` / `reply_followup_replaces`).

    Without a think block the history continues the prompt: `" {reply}\\n\\n"` after `"Assistant:"`.
    With one, the prompt ended inside the block (`"Assistant: <think"`), but clients resend only the
    answer: the follow-up then replaces that last piece with `"Assistant:"` and `" {answer}\\n\\n"`, so
    the state kept after the reply is the one the next request continues from
    (docs/chat-prompts.md#7-resent-history-after-thinking). `history_form` rewrites the answer the way
    the client will send it back (the OpenAI route's tool calls, docs/openai.md#tools).
    """
    think = template.think_mode(think)
    replaces = 0 if think == "off" else 1
    if history_form is None and not replaces:
        return template.assistant_followup, 0
    form = history_form or (lambda answer: answer)

    def followup(reply: str) -> str | tuple[str, ...]:
        _, answer = split_reply(reply, think)
        turn = template.assistant_followup(form(answer))
        return (f"{template.assistant_label}:", turn) if replaces else turn

    return followup, replaces


def constraint_after_think(think: ThinkMode) -> Literal["none", "open", "closed"]:
    """What a constrained reply writes first in a think mode (`OutputConstraint.think`): a free think
    block when the prompt opened one, the closing `>` when fake think closed it, nothing otherwise."""
    if think == "off":
        return "none"
    return "closed" if think == "fake" else "open"

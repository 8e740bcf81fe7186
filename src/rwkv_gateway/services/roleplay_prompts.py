"""Role-play prompt text, names and sampling: the pure rules of the role-play API.

Everything here is a function of its arguments: the persona block prefilled once per character,
the text of a user turn, of a reply and of a "said for the character" message, the validation of
user and character names, and the mapping of the role-play sampling fields (tau, rate, min_p,
temperature, presence_penalty) onto the shared sampler's `SamplingParams`. The rules are written
down in docs/roleplay.md (#7-names, #12-prompt-text, #13-sampling).
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass

from rwkv_gateway.domain.types import SamplingParams

NAME_MAX = 64
#: State-store keys: persona states are shared by content (across users), node states are not.
PERSONA_KEY_PREFIX = "roleplay-persona:"
NODE_KEY_PREFIX = "roleplay-node:"
#: End-of-text in the World vocabulary: banned at every step (the reference could sample it first).
EOS_TOKEN = 0
#: A reply ends at the first blank line.
REPLY_STOP = "\n\n"
#: Single-token punctuation the sampler never repeats right after consuming it
#: (docs/roleplay.md#13-sampling, step 1).
AVOID_REPEAT = ".!?,()[]{}。！？，（）:："  # noqa: RUF001 (the full-width forms are meant)

DEFAULT_TAU = 3.0
DEFAULT_RATE = 0.1
DEFAULT_MIN_P = 0.05
DEFAULT_TEMPERATURE = 1.2
DEFAULT_PRESENCE_PENALTY = 0.2
#: Stands in for the reference's rate 0 (a fixed mu): the sampler requires a positive rate.
_TINY_RATE = 1e-12


def valid_name(name: str | None) -> str | None:
    """The NFC form of a user or character name, or None when it is not acceptable: 1-64 characters,
    no slash, backslash or control character, not "." or ".." (docs/roleplay.md#7-names)."""
    if name is None:
        return None
    name = unicodedata.normalize("NFC", name)
    if not 1 <= len(name) <= NAME_MAX or name in (".", ".."):
        return None
    if any(c in "/\\" or unicodedata.category(c) == "Cc" for c in name):
        return None
    return name


@dataclass(frozen=True, slots=True)
class CardText:
    """The fields of a character that shape its prompt."""

    user: str
    bot: str
    greeting: str
    bot_persona: str
    example_message: str
    use_qa: bool

    @property
    def user_label(self) -> str:
        return "User" if self.use_qa else self.user

    @property
    def bot_label(self) -> str:
        return "Assistant" if self.use_qa else self.bot

    def substitute(self, text: str) -> str:
        # Always the real names, whatever use_qa says; {{char}} first, as the reference does.
        return text.replace("{{char}}", self.bot).replace("{{user}}", self.user)


def persona_block(card: CardText, *, with_greeting: bool = True) -> str:
    """Examples, persona and greeting line: the text prefilled once per character
    (docs/roleplay.md#12-prompt-text)."""
    examples = card.substitute(card.example_message)
    persona = card.substitute(card.bot_persona)
    raw = (examples + "\n\n" if examples else "") + persona
    block = "\n".join(line.strip() for line in raw.strip().split("\n")).strip() + "\n\n"
    if with_greeting and card.greeting:
        block += f"{card.bot_label}: {card.greeting}\n\n"
    return block


def user_turn(card: CardText, prompt: str) -> str:
    """The text fed for a user message: no space after the final colon, the model adds it
    (docs/roleplay.md#12-prompt-text)."""
    return f"{card.user_label}: {prompt}\n\n{card.bot_label}:"


def said_for_character(message: str) -> str:
    """The text fed after the pre-reply state for `/chat/tamper` (and a rebuilt reply)."""
    return f" {message}\n\n"


def _or_default(value: float | None, default: float) -> float:
    return default if value is None or not math.isfinite(value) else value


def sampling_params(
    *,
    tau: float | None = None,
    rate: float | None = None,
    min_p: float | None = None,
    temperature: float | None = None,
    presence_penalty: float | None = None,
) -> SamplingParams:
    """The role-play sampler (docs/roleplay.md#13-sampling) on the shared sampler. Absent or
    non-finite values take the defaults.

    The RWKV Mirostat v2 with `tau` and `rate` (mu starts at 2*tau; truncation, then min-p, on the
    temperature-1 distribution; the temperature then reshapes the survivors; mu learns from the chosen
    token's untruncated probability); `min_p` when 0 < m < 1; the presence
    penalty is multiplicative (logits divided or multiplied by 1 + alpha) and counts only tokens of
    the current reply; end-of-text is banned at every step. Temperature <= 0, and tau <= 0 (which the
    reference turns into a greedy reply), are greedy. alpha <= -1 would divide by zero: default.
    """
    t = _or_default(temperature, DEFAULT_TEMPERATURE)
    tau_v = _or_default(tau, DEFAULT_TAU)
    eta = _or_default(rate, DEFAULT_RATE)
    m = _or_default(min_p, DEFAULT_MIN_P)
    alpha = _or_default(presence_penalty, DEFAULT_PRESENCE_PENALTY)
    if alpha <= -1:
        alpha = DEFAULT_PRESENCE_PENALTY
    greedy = t <= 0 or tau_v <= 0
    return SamplingParams(
        temperature=0.0 if greedy else t,
        mirostat_tau=None if greedy else tau_v,
        mirostat_eta=eta if eta > 0 else _TINY_RATE,
        min_p=m if 0 < m < 1 else 0.0,
        temperature_last=True,
        mirostat_variant="rwkv",
        repetition_penalty=1.0 + alpha,
        penalize_prompt=False,
        banned_tokens=frozenset({EOS_TOKEN}),
    )

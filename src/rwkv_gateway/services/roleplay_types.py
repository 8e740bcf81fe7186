"""What the role-play routes see of the role-play services, free of any database import.

The messages of the reference (docs/roleplay.md#4-messages), the failure type that carries them, the
account value type and the `ReplyJob` a reply or resay hands to the route (with the turn it stores
when it ends).
"""

# ruff: noqa: RUF001  (the reference's messages use full-width punctuation)

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from rwkv_gateway.domain.engine import Engine, TokenStream
from rwkv_gateway.domain.types import Finish, FinishReason, Snapshot, TextDelta
from rwkv_gateway.errors import GatewayError

logger = logging.getLogger(__name__)

# The reference's messages, byte for byte (docs/roleplay.md#4-messages).
MSG_KEY_MISSING = "缺少关键参数"
MSG_NO_USER = "用户不存在"
MSG_BAD_PASSWORD = "密码不正确"
MSG_LOGIN_FAILED = "登陆失败"
MSG_EMPTY = "关键参数为空"
MSG_STALE_TOKEN = "token失效，请重新登录"


MSG_NO_CHARACTER = "角色不存在"
MSG_NOT_LOADED = "尚未加载角色"
MSG_NOT_STARTED = "尚未开始对话"
MSG_NO_NODE = "回溯节点不存在"
MSG_BAD_NAME = "角色名称不合法"
MSG_AVATAR_TOO_LARGE = "头像图片过大"
MSG_BUSY = "角色正在回复中，请稍后再试"

Row = list[str | None]


class RoleplayFailure(GatewayError):
    """A role-play outcome with the reference's message and application code (HTTP stays 200)."""

    code = "roleplay"
    http_status = 400

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Account:
    id: int
    name: str
    is_guest: bool


@dataclass(frozen=True, slots=True)
class NewTurn:
    """What a reply stores when it ends: a user node and a bot node after node `after_id`."""

    conversation_id: int
    after_id: int
    after_position: int
    prompt: str
    #: What was fed for the user turn, and the state right after it (the reply starts there).
    turn_text: str
    pre: Snapshot


@dataclass(frozen=True, slots=True)
class NewReply:
    """What a resay stores when it ends: bot node `bot_id` gets the new reply (and its old state goes)."""

    bot_id: int
    old_key: str | None


@dataclass(frozen=True, slots=True)
class Reply:
    """A reply that ended normally: as generated, as stored and shown last, and how it ended."""

    raw: str
    final: str
    finish: Finish


class ReplyJob:
    """An admitted reply or resay: its text as it grows, then (when generation ends normally) `reply`.

    The job itself writes nothing: the route saves the turn with `RoleplayService.save_reply` once
    `texts()` is done, so a job that is cancelled or closed early (client gone) leaves the chat as it
    was. `close()` cancels the generation if it still runs and releases the (user, character) guard.
    """

    def __init__(
        self, engine: Engine, stream: TokenStream, turn: NewTurn | NewReply, release: Callable[[], None]
    ) -> None:
        #: The engine generating the reply: the states the turn stores belong to its model.
        self.engine = engine
        self._stream = stream
        self.turn = turn
        self._release = release
        self._released = False
        #: Set when generation ended normally (stop or length); None after a failure.
        self.reply: Reply | None = None

    async def texts(self) -> AsyncIterator[str]:
        """The whole reply so far after every piece of text. The stored final text (stripped after a
        stop, as generated at the length cap) is `reply.final`; nothing more after a failure."""
        text = ""
        finish: Finish | None = None
        held = False
        async for event in self._stream:
            if isinstance(event, TextDelta):
                if held:
                    yield text
                text += event.text
                # A piece ending in U+FFFD may be the decoder giving up on a character the length
                # cap split; that is known only with the next event, so it waits for it.
                held = text.endswith("\ufffd")
                if not held:
                    yield text
            else:
                finish = event
        if held and (finish is None or finish.reason is not FinishReason.LENGTH):
            yield text
        if finish is None or finish.reason not in (FinishReason.STOP, FinishReason.LENGTH):
            logger.warning("role-play reply ended without a reply: %s", finish and finish.error)
            return
        # At the length cap the text is kept as generated (docs/roleplay.md#11-the-reply-stream)
        # minus a character the cap split (the decoder's replacement for its partial bytes).
        final = text.strip() if finish.reason is FinishReason.STOP else text.rstrip("\ufffd")
        self.reply = Reply(text, final, finish)

    def close(self) -> None:
        if not self._released:
            self._released = True
            self._stream.cancel()
            self._release()

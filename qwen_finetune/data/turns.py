"""A normalised conversation as the ChatML turns the model sees: system first, then user and
assistant turns, each made of text pieces that are trained on or not."""

from __future__ import annotations

from dataclasses import dataclass

from . import react
from .formats import ASSISTANT_SIDE, OBSERVATION, TOOL_CALL, USER, Conversation

SYSTEM_ROLE, USER_ROLE, ASSISTANT_ROLE = "system", "user", "assistant"


@dataclass(frozen=True)
class Turn:
    """`pieces` are (text, trained) pairs, encoded one by one. `trained` matters only in assistant
    turns, where it is False for tool results; a plain turn is a single piece."""

    role: str
    pieces: tuple[tuple[str, bool], ...]

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.pieces)


def uses_tools(conversation: Conversation) -> bool:
    return bool(conversation.tools) or any(
        message.role in (TOOL_CALL, OBSERVATION) for message in conversation.messages
    )


def _plain_turns(conversation: Conversation) -> list[Turn]:
    """Without tools every message is its own turn with its text untouched (as the original did)."""
    return [
        Turn(USER_ROLE if message.role == USER else ASSISTANT_ROLE, ((message.content, True),))
        for message in conversation.messages
    ]


def _react_turns(conversation: Conversation) -> list[Turn]:
    """With tools, consecutive calls, results and answers form one assistant turn (ReAct)."""
    turns: list[Turn] = []
    block = []
    asked_first_question = False
    for message in [*conversation.messages, None]:
        if message is not None and message.role in ASSISTANT_SIDE:
            block.append(message)
            continue
        if block:
            turns.append(Turn(ASSISTANT_ROLE, tuple(react.assistant_block(block))))
            block = []
        if message is None:
            break
        if conversation.tools and not asked_first_question:
            text = react.first_question(conversation.tools, message.content)
            asked_first_question = True
        else:
            text = react.tidy(message.content)
        turns.append(Turn(USER_ROLE, ((text, True),)))
    return turns


def conversation_to_turns(conversation: Conversation, default_system: str) -> list[Turn]:
    system = conversation.system if conversation.system is not None else default_system
    body = _react_turns(conversation) if uses_tools(conversation) else _plain_turns(conversation)
    return [Turn(SYSTEM_ROLE, ((system, True),)), *body]

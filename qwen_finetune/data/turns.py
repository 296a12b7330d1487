"""A normalised conversation as the ChatML turns the model sees: system first, then user and
assistant turns, each made of text pieces that are trained on or not."""

from __future__ import annotations

from dataclasses import dataclass, replace

from . import react
from .formats import ASSISTANT_SIDE, OBSERVATION, TOOL_CALL, USER, Conversation
from .pair_formats import PreferencePair

SYSTEM_ROLE, USER_ROLE, ASSISTANT_ROLE = "system", "user", "assistant"


@dataclass(frozen=True)
class Turn:
    """`pieces` are (text, trained) pairs; the turn's text is their concatenation, encoded whole.
    `trained` matters only in assistant turns, where it is False for tool results; a plain turn is a
    single piece."""

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


def conversation_to_turns(
    conversation: Conversation, default_system: str, react_rendering: bool | None = None
) -> list[Turn]:
    """System turn first. `react_rendering` (default: whether the conversation uses tools) picks the
    ReAct rendering; a preference pair decides it once for both of its answers."""
    system = conversation.system if conversation.system is not None else default_system
    if react_rendering is None:
        react_rendering = uses_tools(conversation)
    body = _react_turns(conversation) if react_rendering else _plain_turns(conversation)
    return [Turn(SYSTEM_ROLE, ((system, True),)), *body]


def pair_to_turns(pair: PreferencePair, default_system: str) -> list[Turn]:
    """The prompt's turns, then the chosen and the rejected answer as one assistant turn each. Tool use
    anywhere in the pair renders the prompt and both answers in ReAct, so the prompt is the same for both."""
    react_rendering = uses_tools(pair.prompt) or any(
        message.role == TOOL_CALL for message in [*pair.chosen, *pair.rejected]
    )
    prompt_turns: list[Turn] = []
    answer_turns = []
    for answer in (pair.chosen, pair.rejected):
        conversation = replace(pair.prompt, messages=[*pair.prompt.messages, *answer])
        *prompt_turns, answer_turn = conversation_to_turns(conversation, default_system, react_rendering)
        answer_turns.append(answer_turn)
    return [*prompt_turns, *answer_turns]

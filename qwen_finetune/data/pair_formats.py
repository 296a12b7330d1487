"""Read preference-pair files (JSON array or JSONL): a prompt and two answers to it, chosen and rejected.

Four layouts, detected per file like the conversation formats (docs/data_formats.md):
- qwen / sharegpt (LLaMA-Factory's ranking data): `conversations` holds the prompt turns, `chosen` and
  `rejected` one {from, value} turn each (or a list of them, or a plain string);
- openai: `messages` holds the prompt, `chosen` / `rejected` an assistant message (or a list, or a string);
- trl: `prompt`, `chosen`, `rejected` as strings (the prompt is one user message) or as message lists
  (TRL's conversational form, where the answers are the assistant messages).
A prompt follows the rules of a conversation (system first, tools, observations after calls) and ends
with a user turn; an answer is one assistant message or one or more tool calls.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError
from .formats import (
    ASSISTANT,
    TOOL_CALL,
    USER,
    Conversation,
    Layouts,
    Message,
    Where,
    assemble_messages,
    conversation_items,
    conversation_turn,
    detected_format,
    is_pair,
    openai_items,
    openai_message,
    optional_string,
    shaped_records,
    sharegpt_roles,
    tool_list,
)

PAIR_SHAPES = {
    "conversations": "'conversations' + 'chosen' + 'rejected' (qwen / sharegpt)",
    "openai": "'messages' + 'chosen' + 'rejected' (openai)",
    "trl": "'prompt' + 'chosen' + 'rejected' (trl)",
}
PAIR_FAMILY_OF_FORMAT = {
    "qwen": "conversations",
    "sharegpt": "conversations",
    "openai": "openai",
    "trl": "trl",
}
PROMPT_FIELD = {"conversations": "conversations", "openai": "messages", "trl": "prompt"}
ANSWER_FIELDS = ("chosen", "rejected")


@dataclass
class PreferencePair:
    id: str
    prompt: Conversation  # its messages end with a user message
    chosen: list[Message]
    rejected: list[Message]


@dataclass
class LoadedPairFile:
    path: str
    format: str
    pairs: list[PreferencePair]

    @property
    def leading_turns_dropped(self) -> int:
        return sum(pair.prompt.leading_turns_dropped for pair in self.pairs)


def _family_of(record: dict[str, Any]) -> str | None:
    for family, field_name in PROMPT_FIELD.items():
        if field_name in record:
            return family
    return None


def _conversation_in_pair_data(where: Where, record: dict[str, Any]) -> DataError | None:
    if is_pair(record):
        return None
    return where.error(
        "the sample has no 'chosen' and 'rejected' answers, so it is not a preference pair",
        fix="give every sample a prompt, 'chosen' and 'rejected' (or train conversations with supervised "
        "fine-tuning)",
    )


PAIR_LAYOUTS = Layouts(
    kind="preference pair",
    example='{"prompt": ..., "chosen": ..., "rejected": ...}',
    shapes=PAIR_SHAPES,
    family_of_format=PAIR_FAMILY_OF_FORMAT,
    family_of=_family_of,
    wrong_kind=_conversation_in_pair_data,
)


def _prompt(where: Where, record: dict[str, Any], family: str, data_format: str) -> Conversation:
    field_name = PROMPT_FIELD[family]
    value = record[field_name]
    if family == "conversations":
        roles, format_name = sharegpt_roles(data_format)
        items = conversation_items(where, value, field_name, roles, format_name)
    elif family == "trl" and isinstance(value, str):
        items = [(field_name, Message(USER, value))]
    else:
        items = openai_items(where, value, field_name)
    tools = tool_list(where, record.get("tools") or (record.get("functions") if family == "openai" else None))
    system = optional_string(where, record.get("system"), "system")
    if not items:
        raise where.error(
            "the prompt is empty", fix="give the prompt at least one user turn", field=field_name
        )
    prompt = assemble_messages(where, items, system, tools)
    if not prompt.messages or prompt.messages[-1].role != USER:
        raise where.error(
            "the prompt must end with a user turn: the chosen and rejected answers reply to it",
            fix="leave the answer out of the prompt (it belongs in 'chosen' and 'rejected') and end the prompt "
            "with the user's message",
            field=field_name,
        )
    return prompt


def _answer(where: Where, value: Any, field_name: str, family: str, data_format: str) -> list[Message]:
    if isinstance(value, str):
        items = [(field_name, Message(ASSISTANT, value))]
    elif family == "conversations":
        roles, format_name = sharegpt_roles(data_format)
        items = (
            conversation_items(where, value, field_name, roles, format_name)
            if isinstance(value, list)
            else conversation_turn(where, value, field_name, roles, format_name)
        )
    else:
        items = (
            openai_items(where, value, field_name)
            if isinstance(value, list)
            else openai_message(where, value, field_name)
        )
    answer_roles = [message.role for _, message in items]
    if answer_roles == [ASSISTANT] or (answer_roles and all(role == TOOL_CALL for role in answer_roles)):
        return [message for _, message in items]
    # the turn that does not belong ("chosen[1]"), not its text field ("chosen[1].content")
    wrong = next(
        (name.rsplit(".", 1)[0] for name, message in items if message.role not in (ASSISTANT, TOOL_CALL)),
        field_name,
    )
    raise where.error(
        f"an answer is one assistant message or one or more tool calls, this one has the turns {answer_roles}",
        fix="put only the assistant's reply here; earlier turns belong to the prompt",
        field=wrong,
    )


def _pair(where: Where, record: dict[str, Any], family: str, data_format: str) -> PreferencePair:
    prompt = _prompt(where, record, family, data_format)
    chosen, rejected = (_answer(where, record[name], name, family, data_format) for name in ANSWER_FIELDS)
    return PreferencePair(prompt.id, prompt, chosen, rejected)


def load_pair_file(path: str | Path, data_format: str = "auto") -> LoadedPairFile:
    """Read, detect the layout (one per file) and normalise every pair."""
    shaped = shaped_records(path, data_format, PAIR_LAYOUTS)
    pairs = [_pair(where, record, family, data_format) for where, record, family in shaped]
    found = detected_format(data_format, shaped, ("conversations", *ANSWER_FIELDS))
    return LoadedPairFile(path=str(path), format=found, pairs=pairs)

"""The benchmark's conversations and preference pairs in the dataset shapes peers such as TRL train on.

The files are read by the toolkit's readers (qwen_finetune.data.formats and pair_formats, which also
understand tool calls); each conversation becomes one row of OpenAI-style messages, each pair a row of
prompt messages with its chosen and rejected answers, and the tool list, as a JSON string, the `tools`
column that TRL hands to the tokenizer's chat template. Tokenising, masking and truncating are left
to the peer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qwen_finetune.data.formats import (
    ASSISTANT,
    OBSERVATION,
    SYSTEM,
    TOOL_CALL,
    USER,
    Conversation,
    Message,
    load_file,
)
from qwen_finetune.data.pair_formats import load_pair_file

ROLE_NAMES = {USER: "user", ASSISTANT: "assistant", SYSTEM: "system", OBSERVATION: "tool"}


def conversation_messages(conversation: Conversation) -> list[dict[str, Any]]:
    """The conversation as chat-template messages, its system prompt first when it has one."""
    system = [] if conversation.system is None else [{"role": "system", "content": conversation.system}]
    return system + chat_messages(conversation.messages)


def chat_messages(turns: list[Message]) -> list[dict[str, Any]]:
    """Normalised turns as chat-template messages: consecutive calls form one assistant message."""
    messages: list[dict[str, Any]] = []
    for message in turns:
        if message.role != TOOL_CALL:
            messages.append({"role": ROLE_NAMES[message.role], "content": message.content})
            continue
        call = {
            "type": "function",
            "function": {"name": message.tool_name, "arguments": message.tool_arguments},
        }
        previous = messages[-1] if messages else None
        if previous is not None and previous["role"] == "assistant" and "tool_calls" in previous:
            previous["tool_calls"].append(call)
        else:
            messages.append({"role": "assistant", "content": message.content, "tool_calls": [call]})
    return messages


def messages_rows(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """One {"messages", "tools"} row per conversation of `paths`, in file order."""
    return [
        {"messages": conversation_messages(conversation), "tools": json.dumps(conversation.tools)}
        for path in paths
        for conversation in load_file(path).conversations
    ]


def preference_rows(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """One {"prompt", "chosen", "rejected", "tools"} row per preference pair of `paths` (TRL's
    conversational preference format)."""
    return [
        {
            "prompt": conversation_messages(pair.prompt),
            "chosen": chat_messages(pair.chosen),
            "rejected": chat_messages(pair.rejected),
            "tools": json.dumps(pair.prompt.tools),
        }
        for path in paths
        for pair in load_pair_file(path).pairs
    ]

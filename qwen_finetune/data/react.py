"""Tool use as text, in Qwen's ReAct convention (the one Qwen chat models were tuned on and that
Qwen's OpenAI-compatible server writes into the prompt).

The tool list becomes an instruction put before the first question; a function call becomes
`Thought: ...\\nAction: name\\nAction Input: args`; a tool result becomes `\\nObservation: result`;
an answer in a conversation with tools becomes `Thought: I now know the final answer.\\nFinal Answer: ...`.
The strings are those of the tokenizer's chat template (qwen_model.chat_format), so training data and
chat prompts are the same text. The rendering is documented, with a full example, in docs/data_formats.md.
"""

from __future__ import annotations

import json
from typing import Any

from qwen_model.chat_format import (
    REACT_ACTION,
    REACT_ACTION_INPUT,
    REACT_FINAL_ANSWER,
    REACT_INSTRUCTION,
    REACT_OBSERVATION_LABEL,
    REACT_QUESTION,
    REACT_THOUGHT,
    REACT_TOOL_LINE,
)

from .formats import ASSISTANT, OBSERVATION, TOOL_CALL, Message


def tidy(text: str) -> str:
    """Leading newlines and trailing blanks are dropped, as the ReAct prompt builder does."""
    return text.lstrip("\n").rstrip()


def tool_line(tool: dict[str, Any]) -> str:
    name = tool.get("name_for_model") or tool["name"]
    description = tool.get("description_for_model") or tool.get("description") or ""
    return REACT_TOOL_LINE.format(
        name_for_model=name,
        name_for_human=tool.get("name_for_human") or name,
        description_for_model=description,
        parameters=json.dumps(tool.get("parameters", {}), ensure_ascii=False),
    )


def instruction(tools: list[dict[str, Any]]) -> str:
    names = ", ".join(tool.get("name_for_model") or tool["name"] for tool in tools)
    return REACT_INSTRUCTION.format(
        tool_lines="\n\n".join(tool_line(tool) for tool in tools), tool_names=names
    )


def first_question(tools: list[dict[str, Any]], query: str) -> str:
    return f"{instruction(tools)}{REACT_QUESTION}{tidy(query)}"


def call_text(message: Message) -> str:
    thought = tidy(message.content)
    if not thought.startswith(REACT_THOUGHT):
        thought = f"{REACT_THOUGHT} {thought}"
    return f"{thought}{REACT_ACTION}{message.tool_name}{REACT_ACTION_INPUT}{message.tool_arguments}"


def assistant_block(messages: list[Message]) -> list[tuple[str, bool]]:
    """One assistant turn made of consecutive calls, results and answers, as (text, trained) pieces:
    everything the model writes is trained on; the tool results (after "Observation:") are not."""
    pieces: list[tuple[str, bool]] = []
    for position, message in enumerate(messages):
        separator = "\n" if position else ""
        if message.role == TOOL_CALL:
            pieces.append((separator + call_text(message), True))
        elif message.role == OBSERVATION:
            pieces.append((REACT_OBSERVATION_LABEL, True))
            pieces.append((" " + tidy(message.content), False))
        elif message.role == ASSISTANT:
            pieces.append((separator + REACT_FINAL_ANSWER + tidy(message.content), True))
        else:
            raise ValueError(f"role {message.role!r} cannot be part of an assistant turn")
    return pieces

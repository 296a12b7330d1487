"""Tool use as text, in Qwen's ReAct convention (the one Qwen chat models were tuned on and that
Qwen's OpenAI-compatible server writes into the prompt).

The tool list becomes an instruction put before the first question; a function call becomes
`Thought: ...\\nAction: name\\nAction Input: args`; a tool result becomes `\\nObservation: result`;
an answer in a conversation with tools becomes `Thought: I now know the final answer.\\nFinal Answer: ...`.
The rendering is documented, with a full example, in docs/data_formats.md.
"""

from __future__ import annotations

import json
from typing import Any

from .formats import ASSISTANT, OBSERVATION, TOOL_CALL, Message

TOOL_LINE = (
    "{name_for_model}: Call this tool to interact with the {name_for_human} API. "
    "What is the {name_for_human} API useful for? {description_for_model} Parameters: {parameters}"
)
INSTRUCTION = """Answer the following questions as best you can. You have access to the following APIs:

{tool_lines}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tool_names}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""
FINAL_ANSWER = "Thought: I now know the final answer.\nFinal Answer: {answer}"
OBSERVATION_LABEL = "\nObservation:"


def tidy(text: str) -> str:
    """Leading newlines and trailing blanks are dropped, as the ReAct prompt builder does."""
    return text.lstrip("\n").rstrip()


def tool_line(tool: dict[str, Any]) -> str:
    name = tool.get("name_for_model") or tool["name"]
    description = tool.get("description_for_model") or tool.get("description") or ""
    return TOOL_LINE.format(
        name_for_model=name,
        name_for_human=tool.get("name_for_human") or name,
        description_for_model=description,
        parameters=json.dumps(tool.get("parameters", {}), ensure_ascii=False),
    )


def instruction(tools: list[dict[str, Any]]) -> str:
    names = ", ".join(tool.get("name_for_model") or tool["name"] for tool in tools)
    return INSTRUCTION.format(tool_lines="\n\n".join(tool_line(tool) for tool in tools), tool_names=names)


def first_question(tools: list[dict[str, Any]], query: str) -> str:
    return f"{instruction(tools)}\n\nQuestion: {tidy(query)}"


def call_text(message: Message) -> str:
    thought = tidy(message.content)
    if not thought.startswith("Thought:"):
        thought = f"Thought: {thought}"
    return f"{thought}\nAction: {message.tool_name}\nAction Input: {message.tool_arguments}"


def assistant_block(messages: list[Message]) -> list[tuple[str, bool]]:
    """One assistant turn made of consecutive calls, results and answers, as (text, trained) pieces:
    everything the model writes is trained on; the tool results (after "Observation:") are not."""
    pieces: list[tuple[str, bool]] = []
    for position, message in enumerate(messages):
        separator = "\n" if position else ""
        if message.role == TOOL_CALL:
            pieces.append((separator + call_text(message), True))
        elif message.role == OBSERVATION:
            pieces.append((OBSERVATION_LABEL, True))
            pieces.append((" " + tidy(message.content), False))
        elif message.role == ASSISTANT:
            pieces.append((separator + FINAL_ANSWER.format(answer=tidy(message.content)), True))
        else:
            raise ValueError(f"role {message.role!r} cannot be part of an assistant turn")
    return pieces

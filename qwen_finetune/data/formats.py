"""Read conversation files (JSON array or JSONL) and normalise every sample to one shape.

Four input formats are understood (see docs/data_formats.md): the original Qwen format, ShareGPT
(with function_call/observation turns and a `tools` field), OpenAI messages (with tool_calls and
tool messages) and Alpaca. Whatever the input, a sample becomes a `Conversation`: an id, an optional
system prompt, an optional tool list, and messages whose role is one of user, assistant, tool_call,
observation. Anything we cannot interpret is a `DataError` that names the file, the sample and the
field; nothing is silently guessed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError

USER, ASSISTANT, TOOL_CALL, OBSERVATION, SYSTEM = "user", "assistant", "tool_call", "observation", "system"
ASSISTANT_SIDE = (ASSISTANT, TOOL_CALL, OBSERVATION)

QWEN_ROLES = {"user": USER, "assistant": ASSISTANT, "system": SYSTEM}
SHAREGPT_ROLES = {
    **QWEN_ROLES,
    "human": USER,
    "gpt": ASSISTANT,
    "function_call": TOOL_CALL,
    "observation": OBSERVATION,
}
SHAREGPT_ONLY_ROLES = SHAREGPT_ROLES.keys() - QWEN_ROLES.keys()
OPENAI_ROLES = {
    "system": SYSTEM,
    "user": USER,
    "assistant": ASSISTANT,
    "tool": OBSERVATION,
    "function": OBSERVATION,
}

# The key that identifies each family of formats; qwen and sharegpt share one shape.
SHAPES = {
    "conversations": "'conversations' (qwen / sharegpt)",
    "openai": "'messages' (openai)",
    "alpaca": "'instruction' + 'output' (alpaca)",
}
FAMILY_OF_FORMAT = {
    "qwen": "conversations",
    "sharegpt": "conversations",
    "openai": "openai",
    "alpaca": "alpaca",
}


@dataclass
class Message:
    """One normalised turn. For role tool_call, `content` is the optional thought text that came with
    the call, and `tool_name` / `tool_arguments` (a string, usually JSON) describe the call."""

    role: str
    content: str
    tool_name: str = ""
    tool_arguments: str = ""


@dataclass
class Conversation:
    id: str
    messages: list[Message]
    system: str | None = None
    tools: list[dict[str, Any]] = field(default_factory=list)
    leading_turns_dropped: int = 0


@dataclass
class LoadedFile:
    path: str
    format: str
    conversations: list[Conversation]

    @property
    def leading_turns_dropped(self) -> int:
        return sum(conversation.leading_turns_dropped for conversation in self.conversations)


# What each format reader returns: (field name, message) pairs, the system field, the tool list.
_ParsedSample = tuple[list[tuple[str, Message]], str | None, list[dict[str, Any]]]


@dataclass
class _Where:
    """Where a sample came from, so every error can say it."""

    file: str
    index: int
    sample_id: str | None
    line: int | None

    def error(self, problem: str, fix: str, field: str | None = None) -> DataError:
        return DataError(
            problem,
            fix=fix,
            file=self.file,
            index=self.index,
            sample_id=self.sample_id,
            field=field,
            line=self.line,
        )


# ---------------------------------------------------------------------------------------------- reading


def _decode_utf8(path: Path, data: bytes) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise DataError(
            f"bytes that are not valid UTF-8 at byte offset {error.start} ({data[error.start : error.end]!r})",
            fix="re-save the file as UTF-8 (for example `iconv -f GBK -t UTF-8 in.json > out.json`)",
            file=path,
            line=line,
            column=column,
        ) from None


def _parse_jsonl(path: Path, text: str) -> tuple[list[Any], list[int | None]]:
    records: list[Any] = []
    lines: list[int | None] = []
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DataError(
                f"this JSONL line is not valid JSON ({error.msg})",
                fix="make every non-empty line one complete JSON object (no trailing commas, no line breaks "
                "inside a sample)",
                file=path,
                line=line_number,
                column=error.colno,
            ) from None
        lines.append(line_number)
    return records, lines


def _parse_json(path: Path, text: str) -> tuple[list[Any], list[int | None]]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        first_line = text.lstrip().split("\n", 1)[0]
        if error.msg == "Extra data" and first_line.startswith("{"):
            return _parse_jsonl(path, text)
        raise DataError(
            f"invalid JSON ({error.msg})",
            fix="correct the JSON at that position (a missing comma or quote is the usual cause)",
            file=path,
            line=error.lineno,
            column=error.colno,
        ) from None
    if not isinstance(value, list):
        raise DataError(
            f"the top-level JSON value is {_type_name(value)}, expected an array of samples",
            fix="put the samples in a JSON array [...], or write a .jsonl file with one sample per line",
            file=path,
        )
    return value, [None] * len(value)


def read_records(path: str | Path) -> tuple[list[Any], list[int | None]]:
    """The raw samples of a .json (array) or .jsonl file, with their line numbers (JSONL only)."""
    path = Path(path)
    if not path.is_file():
        problem = "is a directory, not a file" if path.is_dir() else "file not found"
        raise DataError(
            problem,
            fix="check the path given to --data_path / --eval_data_path (several files are comma-separated)",
            file=path,
        )
    data = path.read_bytes()
    text = _decode_utf8(path, data)
    if not text.strip():
        raise DataError("the file is empty", fix="point to a file that contains samples", file=path)
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson")
    records, lines = _parse_jsonl(path, text) if jsonl else _parse_json(path, text)
    if not records:
        raise DataError(
            "the file contains no samples", fix="point to a file that contains samples", file=path
        )
    return records, lines


# ------------------------------------------------------------------------------------------ validation


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _string(where: _Where, value: Any, field_name: str, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise where.error(
            f"is {_type_name(value)}, expected a string",
            fix="give the text as a JSON string (join lists of parts into one string)",
            field=field_name,
        )
    return value


def _family_of(record: dict[str, Any]) -> str | None:
    if "conversations" in record:
        return "conversations"
    if "messages" in record:
        return "openai"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return None


def _sample_id(record: Any) -> str | None:
    if isinstance(record, dict) and record.get("id") is not None:
        return str(record["id"])
    return None


# ------------------------------------------------------------------------------------ per-format reading


def _tools(where: _Where, value: Any, field_name: str = "tools") -> list[dict[str, Any]]:
    """A tool list: a JSON array (or a string holding one) of functions, each either
    {name, description, parameters} or OpenAI's {"type": "function", "function": {...}}."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise where.error(
                f"is a string that is not valid JSON ({error.msg})",
                fix="give the tools as a JSON array (or a string containing one)",
                field=field_name,
            ) from None
    if not isinstance(value, list):
        raise where.error(
            f"is {_type_name(value)}, expected an array of tool descriptions",
            fix='write [{"name": ..., "description": ..., "parameters": {...}}, ...]',
            field=field_name,
        )
    tools = []
    for position, tool in enumerate(value):
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
            tool = tool["function"]
        if not isinstance(tool, dict) or not isinstance(tool.get("name") or tool.get("name_for_model"), str):
            raise where.error(
                "is not a tool description with a string 'name'",
                fix='describe each tool as {"name": ..., "description": ..., "parameters": {...}}',
                field=f"{field_name}[{position}]",
            )
        tools.append(tool)
    return tools


def _tool_call_messages(where: _Where, value: Any, field_name: str) -> list[Message]:
    """ShareGPT function_call values: a JSON object {name, arguments} (or an array of them)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise where.error(
                f"function_call value is not valid JSON ({error.msg})",
                fix='write the call as a JSON string \'{"name": "...", "arguments": {...}}\'',
                field=field_name,
            ) from None
    calls = value if isinstance(value, list) else [value]
    messages = []
    for call in calls:
        if not isinstance(call, dict) or not isinstance(call.get("name"), str) or "arguments" not in call:
            raise where.error(
                "function_call value must be an object with a string 'name' and 'arguments'",
                fix='write the call as \'{"name": "...", "arguments": {...}}\'',
                field=field_name,
            )
        messages.append(_call_message(call["name"], call["arguments"]))
    return messages


def _call_message(name: str, arguments: Any) -> Message:
    """A call without thought text (OpenAI messages set it afterwards from the message content)."""
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return Message(TOOL_CALL, "", tool_name=name, tool_arguments=arguments)


def _conversations_turns(
    where: _Where, record: dict[str, Any], roles: dict[str, str], format_name: str
) -> _ParsedSample:
    turns = record["conversations"]
    if not isinstance(turns, list):
        raise where.error(
            f"is {_type_name(turns)}, expected an array of turns",
            fix='write "conversations": [{"from": "user", "value": "..."}, ...]',
            field="conversations",
        )
    items: list[tuple[str, Message]] = []
    for position, turn in enumerate(turns):
        name = f"conversations[{position}]"
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise where.error(
                "a turn must be an object with 'from' and 'value'",
                fix='write each turn as {"from": "user", "value": "..."}',
                field=name,
            )
        role = roles.get(turn["from"]) if isinstance(turn["from"], str) else None
        if role is None:
            raise where.error(
                f"unknown role {turn['from']!r} for the {format_name} format",
                fix=f"use one of {', '.join(sorted(roles))}",
                field=f"{name}.from",
            )
        value_field = f"{name}.value"
        if role == TOOL_CALL:
            items.extend(
                (value_field, message) for message in _tool_call_messages(where, turn["value"], value_field)
            )
        else:
            items.append((value_field, Message(role, _string(where, turn["value"], value_field))))
    system = _string(where, record.get("system"), "system", optional=True)
    return items, system, _tools(where, record.get("tools"))


def _openai_turns(where: _Where, record: dict[str, Any]) -> _ParsedSample:
    turns = record["messages"]
    if not isinstance(turns, list):
        raise where.error(
            f"is {_type_name(turns)}, expected an array of messages",
            fix='write "messages": [{"role": "user", "content": "..."}, ...]',
            field="messages",
        )
    items: list[tuple[str, Message]] = []
    for position, turn in enumerate(turns):
        name = f"messages[{position}]"
        if not isinstance(turn, dict) or "role" not in turn:
            raise where.error(
                "a message must be an object with 'role' and 'content'",
                fix='write each message as {"role": "user", "content": "..."}',
                field=name,
            )
        role = OPENAI_ROLES.get(turn["role"]) if isinstance(turn["role"], str) else None
        if role is None:
            raise where.error(
                f"unknown role {turn['role']!r} for the openai format",
                fix=f"use one of {', '.join(OPENAI_ROLES)}",
                field=f"{name}.role",
            )
        calls = _openai_calls(where, turn, name) if role == ASSISTANT else []
        content_field = f"{name}.content"
        content = _string(where, turn.get("content"), content_field, optional=bool(calls))
        if calls:
            calls[0].content = content or ""
            items.extend((content_field, call) for call in calls)
        else:
            items.append((content_field, Message(role, content)))
    system = _string(where, record.get("system"), "system", optional=True)
    return items, system, _tools(where, record.get("tools") or record.get("functions"))


def _openai_calls(where: _Where, turn: dict[str, Any], name: str) -> list[Message]:
    """tool_calls [{"type": "function", "function": {name, arguments}}] or legacy function_call."""
    raw_calls = turn.get("tool_calls") or ([turn["function_call"]] if turn.get("function_call") else [])
    if not isinstance(raw_calls, list):
        raise where.error(
            f"is {_type_name(raw_calls)}, expected an array of tool calls",
            fix='write "tool_calls": [{"type": "function", "function": {"name": ..., "arguments": "..."}}]',
            field=f"{name}.tool_calls",
        )
    calls = []
    for position, call in enumerate(raw_calls):
        function = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise where.error(
                "a tool call needs a function with a string 'name' and 'arguments'",
                fix='write {"type": "function", "function": {"name": "...", "arguments": "{...}"}}',
                field=f"{name}.tool_calls[{position}]",
            )
        calls.append(_call_message(function["name"], function.get("arguments", "")))
    return calls


def _alpaca_turns(where: _Where, record: dict[str, Any]) -> _ParsedSample:
    items: list[tuple[str, Message]] = []
    history = record.get("history") or []
    if not isinstance(history, list):
        raise where.error(
            f"is {_type_name(history)}, expected an array of [question, answer] pairs",
            fix='write "history": [["question", "answer"], ...]',
            field="history",
        )
    for position, pair in enumerate(history):
        if not isinstance(pair, list) or len(pair) != 2:
            raise where.error(
                "is not a [question, answer] pair",
                fix='write "history": [["question", "answer"], ...]',
                field=f"history[{position}]",
            )
        items.append(
            (f"history[{position}][0]", Message(USER, _string(where, pair[0], f"history[{position}][0]")))
        )
        items.append(
            (
                f"history[{position}][1]",
                Message(ASSISTANT, _string(where, pair[1], f"history[{position}][1]")),
            )
        )
    instruction = _string(where, record["instruction"], "instruction")
    extra_input = _string(where, record.get("input"), "input", optional=True)
    query = "\n".join(part for part in (instruction, extra_input) if part)
    items.append(("instruction", Message(USER, query)))
    items.append(("output", Message(ASSISTANT, _string(where, record["output"], "output"))))
    system = _string(where, record.get("system"), "system", optional=True)
    return items, system, _tools(where, record.get("tools"))


# ---------------------------------------------------------------------------------------- assembling


def _assemble(
    where: _Where,
    items: list[tuple[str, Message]],
    system: str | None,
    tools: list[dict[str, Any]],
    list_field: str,
) -> Conversation:
    """Checks shared by all formats: system only first, something to learn, observations after calls."""
    if not items:
        raise where.error(
            "the conversation is empty",
            fix="remove the sample or give it at least a user and an assistant turn",
            field=list_field,
        )
    if items[0][1].role == SYSTEM:
        field_name, message = items.pop(0)
        if system is not None and system != message.content:
            raise where.error(
                "the sample has both a 'system' field and a different leading system turn",
                fix="keep only one of them",
                field=field_name,
            )
        system = message.content
    for field_name, message in items:
        if message.role == SYSTEM:
            raise where.error(
                "a system turn is only allowed as the first turn",
                fix="move it to the start of the conversation or merge it into the system prompt",
                field=field_name,
            )
    dropped = 0
    while items and items[0][1].role != USER:
        items.pop(0)
        dropped += 1
    if not any(message.role in (ASSISTANT, TOOL_CALL) for _, message in items):
        raise where.error(
            "the conversation has no assistant turn after a user turn, so there is nothing to learn",
            fix="add the assistant's answer, or remove the sample",
            field=list_field,
        )
    previous = USER
    for field_name, message in items:
        if message.role == OBSERVATION and previous not in (TOOL_CALL, OBSERVATION):
            raise where.error(
                "an observation (tool result) must follow a function call",
                fix="put the function_call / tool_calls turn before the observation / tool turn",
                field=field_name,
            )
        previous = message.role
    return Conversation(
        id=where.sample_id if where.sample_id is not None else f"{Path(where.file).name}:{where.index}",
        messages=[message for _, message in items],
        system=system,
        tools=tools,
        leading_turns_dropped=dropped,
    )


def _normalise(where: _Where, record: dict[str, Any], family: str, data_format: str) -> Conversation:
    if family == "conversations":
        roles = QWEN_ROLES if data_format == "qwen" else SHAREGPT_ROLES
        name = "qwen" if data_format == "qwen" else "qwen/sharegpt"
        return _assemble(where, *_conversations_turns(where, record, roles, name), "conversations")
    if family == "openai":
        return _assemble(where, *_openai_turns(where, record), "messages")
    return _assemble(where, *_alpaca_turns(where, record), "instruction")


def _is_sharegpt(record: dict[str, Any]) -> bool:
    if "system" in record or "tools" in record:
        return True
    turns = record.get("conversations")
    return isinstance(turns, list) and any(
        isinstance(turn, dict) and turn.get("from") in SHAREGPT_ONLY_ROLES for turn in turns
    )


def load_file(path: str | Path, data_format: str = "auto") -> LoadedFile:
    """Read, detect the format (all samples of a file must share it) and normalise every sample."""
    file = str(path)
    records, lines = read_records(path)
    expected_family = FAMILY_OF_FORMAT.get(data_format)
    first_family: str | None = None
    conversations = []
    for index, (record, line) in enumerate(zip(records, lines)):
        where = _Where(file, index, _sample_id(record), line)
        if not isinstance(record, dict):
            raise where.error(
                f"the sample is {_type_name(record)}, expected a JSON object",
                fix='make every sample an object such as {"conversations": [...]}',
            )
        family = _family_of(record)
        if family is None or (expected_family is not None and family != expected_family):
            expected = [SHAPES[expected_family]] if expected_family else list(SHAPES.values())
            raise where.error(
                f"unknown sample shape with keys {sorted(record)}",
                fix=f"give each sample the key(s) {' or '.join(expected)}"
                + (f" as --data_format {data_format} requires" if expected_family else ""),
            )
        if first_family is None:
            first_family = family
        elif family != first_family:
            raise where.error(
                f"mixed formats: this sample is shaped {SHAPES[family]} but sample 0 is {SHAPES[first_family]}",
                fix="use one format per file (split the file, or convert these samples)",
            )
        conversations.append(_normalise(where, record, family, data_format))
    if data_format != "auto":
        detected = data_format
    elif first_family == "conversations":
        detected = "sharegpt" if any(_is_sharegpt(record) for record in records) else "qwen"
    else:
        detected = first_family or "unknown"
    return LoadedFile(path=file, format=detected, conversations=conversations)

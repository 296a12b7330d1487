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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from .errors import DataError

# Every --data_format value. qwen, sharegpt, openai and alpaca hold conversations; qwen, sharegpt,
# openai and trl hold preference pairs (see pair_formats.py).
DataFormat = Literal["auto", "qwen", "sharegpt", "openai", "alpaca", "trl"]
DATA_FORMATS: tuple[str, ...] = get_args(DataFormat)

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
class Where:
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
            f"the top-level JSON value is {type_name(value)}, expected an array of samples",
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


def type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def string_field(where: Where, value: Any, field_name: str) -> str:
    if not isinstance(value, str):
        raise where.error(
            f"is {type_name(value)}, expected a string",
            fix="give the text as a JSON string (join lists of parts into one string)",
            field=field_name,
        )
    return value


def optional_string(where: Where, value: Any, field_name: str) -> str | None:
    return None if value is None else string_field(where, value, field_name)


def _family_of(record: dict[str, Any]) -> str | None:
    if "conversations" in record:
        return "conversations"
    if "messages" in record:
        return "openai"
    if "instruction" in record and "output" in record:
        return "alpaca"
    return None


def sample_id_of(record: Any) -> str | None:
    if isinstance(record, dict) and record.get("id") is not None:
        return str(record["id"])
    return None


# ------------------------------------------------------------------------------------ per-format reading


def tool_list(where: Where, value: Any, field_name: str = "tools") -> list[dict[str, Any]]:
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
            f"is {type_name(value)}, expected an array of tool descriptions",
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


def _tool_call_messages(where: Where, value: Any, field_name: str) -> list[Message]:
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


def conversation_turn(
    where: Where, turn: Any, name: str, roles: dict[str, str], format_name: str
) -> list[tuple[str, Message]]:
    """One {from, value} turn (a function_call value may hold several calls)."""
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
        return [(value_field, message) for message in _tool_call_messages(where, turn["value"], value_field)]
    return [(value_field, Message(role, string_field(where, turn["value"], value_field)))]


def conversation_items(
    where: Where, turns: Any, field_name: str, roles: dict[str, str], format_name: str
) -> list[tuple[str, Message]]:
    if not isinstance(turns, list):
        raise where.error(
            f"is {type_name(turns)}, expected an array of turns",
            fix=f'write "{field_name}": [{{"from": "user", "value": "..."}}, ...]',
            field=field_name,
        )
    return [
        item
        for position, turn in enumerate(turns)
        for item in conversation_turn(where, turn, f"{field_name}[{position}]", roles, format_name)
    ]


def _conversations_turns(
    where: Where, record: dict[str, Any], roles: dict[str, str], format_name: str
) -> _ParsedSample:
    items = conversation_items(where, record["conversations"], "conversations", roles, format_name)
    system = optional_string(where, record.get("system"), "system")
    return items, system, tool_list(where, record.get("tools"))


def openai_message(where: Where, turn: Any, name: str) -> list[tuple[str, Message]]:
    """One {role, content} message (an assistant message with tool calls gives one item per call)."""
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
    content = (
        optional_string(where, turn.get("content"), content_field)
        if calls
        else string_field(where, turn.get("content"), content_field)
    )
    if calls:
        calls[0].content = content or ""
        return [(content_field, call) for call in calls]
    return [(content_field, Message(role, content or ""))]


def openai_items(where: Where, turns: Any, field_name: str) -> list[tuple[str, Message]]:
    if not isinstance(turns, list):
        raise where.error(
            f"is {type_name(turns)}, expected an array of messages",
            fix=f'write "{field_name}": [{{"role": "user", "content": "..."}}, ...]',
            field=field_name,
        )
    return [
        item
        for position, turn in enumerate(turns)
        for item in openai_message(where, turn, f"{field_name}[{position}]")
    ]


def _openai_turns(where: Where, record: dict[str, Any]) -> _ParsedSample:
    items = openai_items(where, record["messages"], "messages")
    system = optional_string(where, record.get("system"), "system")
    return items, system, tool_list(where, record.get("tools") or record.get("functions"))


def _openai_calls(where: Where, turn: dict[str, Any], name: str) -> list[Message]:
    """tool_calls [{"type": "function", "function": {name, arguments}}] or legacy function_call."""
    raw_calls = turn.get("tool_calls") or ([turn["function_call"]] if turn.get("function_call") else [])
    if not isinstance(raw_calls, list):
        raise where.error(
            f"is {type_name(raw_calls)}, expected an array of tool calls",
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


def _alpaca_turns(where: Where, record: dict[str, Any]) -> _ParsedSample:
    items: list[tuple[str, Message]] = []
    history = record.get("history") or []
    if not isinstance(history, list):
        raise where.error(
            f"is {type_name(history)}, expected an array of [question, answer] pairs",
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
            (
                f"history[{position}][0]",
                Message(USER, string_field(where, pair[0], f"history[{position}][0]")),
            )
        )
        items.append(
            (
                f"history[{position}][1]",
                Message(ASSISTANT, string_field(where, pair[1], f"history[{position}][1]")),
            )
        )
    instruction = string_field(where, record["instruction"], "instruction")
    extra_input = optional_string(where, record.get("input"), "input")
    query = "\n".join(part for part in (instruction, extra_input) if part)
    items.append(("instruction", Message(USER, query)))
    items.append(("output", Message(ASSISTANT, string_field(where, record["output"], "output"))))
    system = optional_string(where, record.get("system"), "system")
    return items, system, tool_list(where, record.get("tools"))


# ---------------------------------------------------------------------------------------- assembling


def assemble_messages(
    where: Where,
    items: list[tuple[str, Message]],
    system: str | None,
    tools: list[dict[str, Any]],
) -> Conversation:
    """Checks shared by conversations and prompts: system only first, leading non-user turns dropped,
    observations after calls. The caller checks that `items` is not empty."""
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


def _assemble(
    where: Where,
    items: list[tuple[str, Message]],
    system: str | None,
    tools: list[dict[str, Any]],
    list_field: str,
) -> Conversation:
    """A training conversation: not empty, and with something to learn."""
    if not items:
        raise where.error(
            "the conversation is empty",
            fix="remove the sample or give it at least a user and an assistant turn",
            field=list_field,
        )
    conversation = assemble_messages(where, items, system, tools)
    if not any(message.role in (ASSISTANT, TOOL_CALL) for message in conversation.messages):
        raise where.error(
            "the conversation has no assistant turn after a user turn, so there is nothing to learn",
            fix="add the assistant's answer, or remove the sample",
            field=list_field,
        )
    return conversation


def sharegpt_roles(data_format: str) -> tuple[dict[str, str], str]:
    """The role names a `conversations` sample may use, and how to name that set in errors."""
    return (QWEN_ROLES, "qwen") if data_format == "qwen" else (SHAREGPT_ROLES, "qwen/sharegpt")


def _normalise(where: Where, record: dict[str, Any], family: str, data_format: str) -> Conversation:
    if family == "conversations":
        roles, name = sharegpt_roles(data_format)
        return _assemble(where, *_conversations_turns(where, record, roles, name), "conversations")
    if family == "openai":
        return _assemble(where, *_openai_turns(where, record), "messages")
    return _assemble(where, *_alpaca_turns(where, record), "instruction")


def is_sharegpt(record: dict[str, Any], turn_fields: tuple[str, ...] = ("conversations",)) -> bool:
    """A `conversations` sample with ShareGPT-only features: a system or tools field, or ShareGPT role
    names in any of `turn_fields` (a field may hold a list of turns or a single turn)."""
    if "system" in record or "tools" in record:
        return True
    for name in turn_fields:
        turns = record.get(name)
        turns = turns if isinstance(turns, list) else [turns]
        if any(isinstance(turn, dict) and turn.get("from") in SHAREGPT_ONLY_ROLES for turn in turns):
            return True
    return False


def is_pair(record: dict[str, Any]) -> bool:
    return "chosen" in record and "rejected" in record


@dataclass(frozen=True)
class Layouts:
    """The sample shapes one kind of data accepts, for detection and for errors."""

    kind: str  # "conversation" or "preference pair", as errors name it
    example: str  # a sample object, for the error on a sample that is not one
    shapes: dict[str, str]  # family -> the key(s) that identify it, as errors name them
    family_of_format: dict[str, str]  # --data_format -> family
    family_of: Callable[[dict[str, Any]], str | None]
    wrong_kind: Callable[[Where, dict[str, Any]], DataError | None]


def shaped_records(
    path: str | Path, data_format: str, layouts: Layouts
) -> list[tuple[Where, dict[str, Any], str]]:
    """Every sample of a file with where it is and its family; one family per file."""
    if data_format != "auto" and data_format not in layouts.family_of_format:
        raise DataError(
            f"--data_format {data_format} has no {layouts.kind} layout",
            fix=f"use one of auto, {', '.join(layouts.family_of_format)} for {layouts.kind}s",
            file=path,
        )
    file = str(path)
    records, lines = read_records(path)
    expected_family = layouts.family_of_format.get(data_format)
    first_family: str | None = None
    shaped = []
    for index, (record, line) in enumerate(zip(records, lines)):
        where = Where(file, index, sample_id_of(record), line)
        if not isinstance(record, dict):
            raise where.error(
                f"the sample is {type_name(record)}, expected a JSON object",
                fix=f"make every sample an object such as {layouts.example}",
            )
        wrong_kind = layouts.wrong_kind(where, record)
        if wrong_kind is not None:
            raise wrong_kind
        family = layouts.family_of(record)
        if family is None or (expected_family is not None and family != expected_family):
            expected = [layouts.shapes[expected_family]] if expected_family else list(layouts.shapes.values())
            raise where.error(
                f"unknown sample shape with keys {sorted(record)}",
                fix=f"give each sample the key(s) {' or '.join(expected)}"
                + (f" as --data_format {data_format} requires" if expected_family else ""),
            )
        if first_family is None:
            first_family = family
        elif family != first_family:
            raise where.error(
                f"mixed formats: this sample is shaped {layouts.shapes[family]} but sample 0 is "
                f"{layouts.shapes[first_family]}",
                fix="use one format per file (split the file, or convert these samples)",
            )
        shaped.append((where, record, family))
    return shaped


def detected_format(
    data_format: str, shaped: list[tuple[Where, dict[str, Any], str]], sharegpt_fields: tuple[str, ...]
) -> str:
    """The format name a file is reported with: the forced one, or what its samples look like."""
    if data_format != "auto":
        return data_format
    family = shaped[0][2]
    if family == "conversations":
        return "sharegpt" if any(is_sharegpt(record, sharegpt_fields) for _, record, _ in shaped) else "qwen"
    return family


def _pair_in_conversation_data(where: Where, record: dict[str, Any]) -> DataError | None:
    if not is_pair(record):
        return None
    return where.error(
        "the sample is a preference pair ('chosen' / 'rejected'), not a conversation to imitate",
        fix="train preference pairs with a preference stage, or give supervised samples their answer as the "
        "last assistant turn",
    )


CONVERSATION_LAYOUTS = Layouts(
    kind="conversation",
    example='{"conversations": [...]}',
    shapes=SHAPES,
    family_of_format=FAMILY_OF_FORMAT,
    family_of=_family_of,
    wrong_kind=_pair_in_conversation_data,
)


def load_file(path: str | Path, data_format: str = "auto") -> LoadedFile:
    """Read, detect the format (all samples of a file must share it) and normalise every sample."""
    shaped = shaped_records(path, data_format, CONVERSATION_LAYOUTS)
    conversations = [_normalise(where, record, family, data_format) for where, record, family in shaped]
    return LoadedFile(
        path=str(path),
        format=detected_format(data_format, shaped, ("conversations",)),
        conversations=conversations,
    )

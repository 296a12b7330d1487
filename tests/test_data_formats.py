"""Reading the four input formats (JSON and JSONL) and the errors bad files give."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen_finetune.data.errors import DataError
from qwen_finetune.data.formats import load_file
from qwen_finetune.data.turns import conversation_to_turns

FIXTURES = Path(__file__).parent / "fixtures" / "data"
BAD = FIXTURES / "bad"
DEFAULT_SYSTEM = "You are a helpful assistant."


def roles_and_texts(path: Path | str, data_format: str = "auto") -> list[list[tuple[str, str]]]:
    loaded = load_file(path, data_format)
    return [
        [(turn.role, turn.text) for turn in conversation_to_turns(conversation, DEFAULT_SYSTEM)]
        for conversation in loaded.conversations
    ]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text(
        "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8"
    )
    return path


# ------------------------------------------------------------------------------------------- fixtures


def test_qwen_format_with_system_turn_and_leading_assistant_turn() -> None:
    loaded = load_file(FIXTURES / "qwen_chat.json")
    assert loaded.format == "qwen"
    assert [conversation.id for conversation in loaded.conversations] == [
        "greeting",
        "with_system",
        "leading_assistant",
    ]
    with_system = loaded.conversations[1]
    assert with_system.system == "You answer in one short sentence."
    assert [message.role for message in with_system.messages] == ["user", "assistant", "user", "assistant"]
    leading = loaded.conversations[2]
    assert leading.leading_turns_dropped == 1
    assert [(message.role, message.content) for message in leading.messages] == [
        ("user", "Reset?"),
        ("assistant", "Hold the leaf button for 8 seconds."),
    ]
    assert loaded.leading_turns_dropped == 1


def test_default_system_message_is_used_when_the_sample_has_none() -> None:
    turns = roles_and_texts(FIXTURES / "qwen_chat.json")
    assert turns[0][0] == ("system", DEFAULT_SYSTEM)
    assert turns[1][0] == ("system", "You answer in one short sentence.")


def test_alpaca_with_input_system_and_history() -> None:
    loaded = load_file(FIXTURES / "alpaca_history.json")
    assert loaded.format == "alpaca"
    first, second = loaded.conversations
    assert [(m.role, m.content) for m in first.messages] == [
        ("user", "Translate to French\ngood morning"),
        ("assistant", "bonjour"),
    ]
    assert second.system == "You are a translator."
    assert [(m.role, m.content) for m in second.messages] == [
        ("user", "Translate to French: thank you"),
        ("assistant", "merci"),
        ("user", "And good night?"),
        ("assistant", "bonne nuit"),
    ]


def test_openai_jsonl_with_tool_calls_renders_react() -> None:
    loaded = load_file(FIXTURES / "openai_tools.jsonl")
    assert loaded.format == "openai"
    plain, tools = roles_and_texts(FIXTURES / "openai_tools.jsonl")
    assert plain == [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!")]
    assert tools[1][0] == "user"
    assert tools[1][1].startswith("Answer the following questions as best you can.")
    assert "read_tank: Call this tool to interact with the read_tank API." in tools[1][1]
    assert tools[1][1].endswith("Begin!\n\nQuestion: Water level?")
    assert tools[2] == (
        "assistant",
        'Thought: Let me check.\nAction: read_tank\nAction Input: {"unit": "litre"}\nObservation: 0.4\n'
        "Thought: I now know the final answer.\nFinal Answer: 0.4 litres left.",
    )


def test_sharegpt_and_openai_versions_of_one_tool_conversation_render_identically(tmp_path: Path) -> None:
    sharegpt = json.loads((FIXTURES / "sharegpt_tools.json").read_text())[0]
    call = json.loads(sharegpt["conversations"][1]["value"])
    openai = {
        "messages": [
            {"role": "system", "content": sharegpt["system"]},
            {"role": "user", "content": sharegpt["conversations"][0]["value"]},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {
                            "name": call["name"],
                            "arguments": json.dumps(call["arguments"], ensure_ascii=False),
                        },
                    }
                ],
            },
            {"role": "tool", "content": sharegpt["conversations"][2]["value"]},
            {"role": "assistant", "content": sharegpt["conversations"][3]["value"]},
            {"role": "user", "content": sharegpt["conversations"][4]["value"]},
            {"role": "assistant", "content": sharegpt["conversations"][5]["value"]},
        ],
        "tools": [{"type": "function", "function": tool} for tool in json.loads(sharegpt["tools"])],
    }
    openai_file = write_jsonl(tmp_path / "same.jsonl", [openai])
    assert roles_and_texts(openai_file) == roles_and_texts(FIXTURES / "sharegpt_tools.json")


def test_explicit_format_must_match_the_samples() -> None:
    with pytest.raises(DataError, match="as --data_format alpaca requires"):
        load_file(FIXTURES / "qwen_chat.json", "alpaca")
    with pytest.raises(DataError, match="unknown role 'human' for the qwen format"):
        load_file(FIXTURES / "sharegpt_tools.json", "qwen")
    assert load_file(FIXTURES / "qwen_chat.json", "sharegpt").format == "sharegpt"


def test_example_file_is_bilingual_multi_turn_qwen_format() -> None:
    loaded = load_file(Path(__file__).resolve().parent.parent / "data" / "example.json", "qwen")
    conversations = loaded.conversations
    assert 20 <= len(conversations) <= 40
    assert sum(len(conversation.messages) > 2 for conversation in conversations) >= 4
    texts = [message.content for conversation in conversations for message in conversation.messages]
    assert any("Orbit-7" in text for text in texts) and any("轨道七号" in text for text in texts)
    assert all(conversation.leading_turns_dropped == 0 for conversation in conversations)


# ------------------------------------------------------------------------------------ real shared data


def test_every_shared_file_loads_with_its_format(shared_data_dir: Path) -> None:
    expected = {
        "llamafactory_alpaca_en_demo.json": ("alpaca", 999),
        "llamafactory_alpaca_zh_demo.json": ("alpaca", 1000),
        "llamafactory_glaive_toolcall_en_demo.json": ("sharegpt", 300),
        "llamafactory_identity.json": ("alpaca", 91),
        "qwen_test_sampled.json": ("qwen", 2),
    }
    for name, (data_format, count) in expected.items():
        loaded = load_file(shared_data_dir / name)
        assert (loaded.format, len(loaded.conversations)) == (data_format, count), name


def test_glaive_tool_conversations_as_openai_jsonl_render_like_sharegpt(
    shared_data_dir: Path, tmp_path: Path
) -> None:
    """All 300 real ShareGPT tool conversations, converted to OpenAI messages in JSONL, give the same turns."""
    source = shared_data_dir / "llamafactory_glaive_toolcall_en_demo.json"
    records = []
    for sample in json.loads(source.read_text()):
        messages = []
        for turn in sample["conversations"]:
            if turn["from"] == "function_call":
                call = json.loads(turn["value"])
                arguments = json.dumps(call["arguments"], ensure_ascii=False)
                messages.append(
                    {
                        "role": "assistant",
                        "content": "",
                        "tool_calls": [
                            {"type": "function", "function": {"name": call["name"], "arguments": arguments}}
                        ],
                    }
                )
            else:
                role = {"human": "user", "gpt": "assistant", "observation": "tool"}[turn["from"]]
                messages.append({"role": role, "content": turn["value"]})
        records.append({"messages": messages, "tools": json.loads(sample["tools"] or "[]")})
    converted = write_jsonl(tmp_path / "glaive_openai.jsonl", records)
    assert load_file(converted).format == "openai"
    assert roles_and_texts(converted) == roles_and_texts(source)


def test_alpaca_as_qwen_format_renders_identically(shared_data_dir: Path, tmp_path: Path) -> None:
    source = shared_data_dir / "llamafactory_alpaca_zh_demo.json"
    records = [
        {
            "id": str(index),
            "conversations": [
                {
                    "from": "user",
                    "value": "\n".join(part for part in (sample["instruction"], sample["input"]) if part),
                },
                {"from": "assistant", "value": sample["output"]},
            ],
        }
        for index, sample in enumerate(json.loads(source.read_text()))
    ]
    converted = tmp_path / "alpaca_zh_qwen.json"
    converted.write_text(json.dumps(records, ensure_ascii=False))
    assert roles_and_texts(converted) == roles_and_texts(source)


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("empty.json", {"problem": "the file is empty"}),
        ("invalid.json", {"problem": "invalid JSON (Expecting ',' delimiter)", "line": 4, "column": 5}),
        ("bad_line.jsonl", {"problem": "this JSONL line is not valid JSON (Expecting value)", "line": 2}),
        (
            "unknown_shape.json",
            {
                "problem": "unknown sample shape with keys ['answer', 'id', 'question']",
                "index": 0,
                "sample_id": "q1",
            },
        ),
        (
            "unknown_role.json",
            {
                "problem": "unknown role 'bot' for the qwen/sharegpt format",
                "index": 0,
                "field": "conversations[1].from",
            },
        ),
        (
            "non_string.json",
            {
                "problem": "is an array, expected a string",
                "index": 1,
                "sample_id": "n1",
                "field": "messages[0].content",
            },
        ),
        (
            "empty_conversation.json",
            {"problem": "the conversation is empty", "sample_id": "e1", "field": "conversations"},
        ),
        (
            "no_assistant.json",
            {
                "problem": "the conversation has no assistant turn after a user turn, so there is nothing to learn",
                "sample_id": "u1",
            },
        ),
        ("mixed.json", {"index": 1, "sample_id": None}),
        ("non_utf8.json", {"line": 1, "column": 48}),
    ],
)
def test_bad_files_raise_one_error_naming_file_sample_field_and_fix(name: str, expected: dict) -> None:
    with pytest.raises(DataError) as raised:
        load_file(BAD / name)
    error = raised.value
    assert error.file == str(BAD / name)
    assert error.fix
    for attribute, value in expected.items():
        assert getattr(error, attribute) == value, attribute
    message = str(error)
    assert message.startswith(str(BAD / name))
    assert "Fix: " in message


def test_mixed_and_non_utf8_messages_explain_the_problem() -> None:
    with pytest.raises(
        DataError, match=r"mixed formats: this sample is shaped 'messages' \(openai\) but sample 0"
    ):
        load_file(BAD / "mixed.json")
    with pytest.raises(DataError, match=r"not valid UTF-8 at byte offset 47.*iconv -f GBK"):
        load_file(BAD / "non_utf8.json")


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found. Fix: check the path"):
        load_file(tmp_path / "nope.json")
    with pytest.raises(DataError, match="is a directory"):
        load_file(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"conversations": []}', "the top-level JSON value is an object, expected an array of samples"),
        ("[]", "the file contains no samples"),
        ('["just text"]', "the sample is a string, expected a JSON object"),
        (
            '[{"conversations": [{"from": "user", "value": "a"}, {"from": "system", "value": "b"},'
            ' {"from": "assistant", "value": "c"}]}]',
            "a system turn is only allowed as the first turn",
        ),
        (
            '[{"conversations": [{"from": "human", "value": "a"}, {"from": "observation", "value": "b"},'
            ' {"from": "gpt", "value": "c"}]}]',
            "an observation \\(tool result\\) must follow a function call",
        ),
        (
            '[{"conversations": [{"from": "human", "value": "a"}, {"from": "function_call", "value": "oops"}]}]',
            "function_call value is not valid JSON",
        ),
        (
            '[{"conversations": [{"from": "human", "value": "a"}], "tools": 5}]',
            "expected an array of tool descriptions",
        ),
        ('[{"instruction": "a", "output": ["b", "c"]}]', "field 'output': is an array, expected a string"),
    ],
)
def test_more_malformed_samples(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "sample.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_file(path)


def test_json_file_holding_jsonl_is_read_as_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "lines.json"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n')
    assert len(load_file(path).conversations) == 2

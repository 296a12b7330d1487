"""Preference pairs: the four layouts, ChatML encoding token by token, over-long pairs, the report,
the cache, --check_data / --dump_encoded, and the errors bad pair files give."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwen_finetune.data import DataArguments, DataError, make_supervised_data, run_check_data
from qwen_finetune.data.chatml import IGNORE_INDEX
from qwen_finetune.data.pair_formats import load_pair_file
from qwen_finetune.data.pairs import SKIP_ANSWER_TOO_LONG, SKIP_PROMPT_TOO_LONG
from qwen_finetune.errors import ArgumentError
from qwen_finetune.preference import make_preference_data

IM_START, IM_END, NEWLINE = 151644, 151645, 198
DEFAULT_SYSTEM = "You are a helpful assistant."

# One multi-turn pair with a system prompt, in each layout.
SYSTEM, Q1, A1, Q2, GOOD, BAD = "Answer briefly.", "Hi!", "Hello.", "2+2?", "4.", "Five, I believe."
LAYOUTS = {
    "sharegpt": {
        "conversations": [
            {"from": "system", "value": SYSTEM},
            {"from": "human", "value": Q1},
            {"from": "gpt", "value": A1},
            {"from": "human", "value": Q2},
        ],
        "chosen": {"from": "gpt", "value": GOOD},
        "rejected": {"from": "gpt", "value": BAD},
    },
    "qwen": {
        "conversations": [
            {"from": "system", "value": SYSTEM},
            {"from": "user", "value": Q1},
            {"from": "assistant", "value": A1},
            {"from": "user", "value": Q2},
        ],
        "chosen": GOOD,
        "rejected": [{"from": "assistant", "value": BAD}],
    },
    "openai": {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": Q1},
            {"role": "assistant", "content": A1},
            {"role": "user", "content": Q2},
        ],
        "chosen": {"role": "assistant", "content": GOOD},
        "rejected": {"role": "assistant", "content": BAD},
    },
    "trl": {
        "prompt": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": Q1},
            {"role": "assistant", "content": A1},
            {"role": "user", "content": Q2},
        ],
        "chosen": [{"role": "assistant", "content": GOOD}],
        "rejected": [{"role": "assistant", "content": BAD}],
    },
}


def write(path: Path, records: list[dict], jsonl: bool = False) -> Path:
    if jsonl:
        path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
    else:
        path.write_text(json.dumps(records, ensure_ascii=False))
    return path


def pair_data(tokenizer, path: Path, tmp_path: Path, max_length: int = 512, **options):
    args = DataArguments(data_path=str(path), data_cache_dir=str(tmp_path / "cache"), **options)
    return make_preference_data(args, tokenizer, max_length)


def turn(tokenizer, role: str, text: str) -> list[int]:
    return [IM_START, *tokenizer.encode_text(role), NEWLINE, *tokenizer.encode_text(text), IM_END, NEWLINE]


def answer_header(tokenizer) -> list[int]:
    return [IM_START, *tokenizer.encode_text("assistant"), NEWLINE]


# ------------------------------------------------------------------------------------- layouts


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_is_detected_and_encoded_token_by_token(tokenizer, tmp_path: Path, layout: str) -> None:
    path = write(tmp_path / f"{layout}.jsonl", [LAYOUTS[layout]], jsonl=True)
    data = pair_data(tokenizer, path, tmp_path)
    assert data.report["files"][0]["format"] == layout
    [row] = list(data.train_dataset)
    expected_prompt = [
        *turn(tokenizer, "system", SYSTEM),
        *turn(tokenizer, "user", Q1),
        *turn(tokenizer, "assistant", A1),
        *turn(tokenizer, "user", Q2),
        *answer_header(tokenizer),
    ]
    assert row["prompt_ids"] == expected_prompt
    for answer, text in (("chosen", GOOD), ("rejected", BAD)):
        assert row[f"{answer}_ids"] == [*tokenizer.encode_text(text), IM_END]
        assert row[f"{answer}_labels"] == row[f"{answer}_ids"]  # every answer token is trained on
    assert row["length"] == len(expected_prompt) + max(len(row["chosen_ids"]), len(row["rejected_ids"]))


def test_trl_strings_are_one_user_turn_under_the_default_system_prompt(tokenizer, tmp_path: Path) -> None:
    path = write(tmp_path / "trl.json", [{"prompt": "Why?", "chosen": "Because.", "rejected": "No."}])
    [row] = list(pair_data(tokenizer, path, tmp_path).train_dataset)
    assert row["prompt_ids"] == [
        *turn(tokenizer, "system", DEFAULT_SYSTEM),
        *turn(tokenizer, "user", "Why?"),
        *answer_header(tokenizer),
    ]
    assert row["chosen_ids"] == [*tokenizer.encode_text("Because."), IM_END]


def test_system_message_flag_is_the_default_system_prompt(tokenizer, tmp_path: Path) -> None:
    path = write(tmp_path / "trl.json", [{"prompt": "Why?", "chosen": "Because.", "rejected": "No."}])
    [row] = list(pair_data(tokenizer, path, tmp_path, system_message="Be kind.").train_dataset)
    assert row["prompt_ids"][: len(turn(tokenizer, "system", "Be kind."))] == turn(
        tokenizer, "system", "Be kind."
    )


def test_tool_call_answer_renders_the_prompt_in_react_for_both_answers(tokenizer, tmp_path: Path) -> None:
    tools = [{"name": "get_weather", "description": "Weather of a city", "parameters": {}}]
    call = {
        "from": "function_call",
        "value": json.dumps({"name": "get_weather", "arguments": {"city": "Oslo"}}),
    }
    record = {
        "conversations": [{"from": "human", "value": "Weather in Oslo?"}],
        "tools": json.dumps(tools),
        "chosen": call,
        "rejected": {"from": "gpt", "value": "Sunny, surely."},
    }
    [pair] = load_pair_file(write(tmp_path / "tools.json", [record])).pairs
    assert [message.role for message in pair.chosen] == ["tool_call"]
    [row] = list(pair_data(tokenizer, tmp_path / "tools.json", tmp_path).train_dataset)
    prompt = tokenizer.decode(row["prompt_ids"])
    assert "get_weather: Call this tool" in prompt and prompt.endswith(
        "Question: Weather in Oslo?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.decode(row["chosen_ids"]) == (
        'Thought: \nAction: get_weather\nAction Input: {"city": "Oslo"}<|im_end|>'
    )
    assert tokenizer.decode(row["rejected_ids"]) == (
        "Thought: I now know the final answer.\nFinal Answer: Sunny, surely.<|im_end|>"
    )


def test_shared_llamafactory_pair_files(tokenizer, shared_data_dir: Path, tmp_path: Path) -> None:
    """LLaMA-Factory's ranking demo data (English and Chinese): system prompts, multi-turn prompts."""
    for name in ("llamafactory_dpo_en_demo.json", "llamafactory_dpo_zh_demo.json"):
        loaded = load_pair_file(shared_data_dir / name)
        assert (loaded.format, len(loaded.pairs)) == ("sharegpt", 300), name
        assert any(pair.prompt.system is not None for pair in loaded.pairs)
        assert all(pair.prompt.messages[-1].role == "user" for pair in loaded.pairs)
    english = shared_data_dir / "llamafactory_dpo_en_demo.json"
    records = json.loads(english.read_text())
    multi_turn = next(index for index, record in enumerate(records) if len(record["conversations"]) == 7)
    data = pair_data(tokenizer, english, tmp_path, max_length=4096)
    row = data.train_samples[multi_turn]
    assert tokenizer.decode(row["prompt_ids"]).count("<|im_start|>") == 1 + 7 + 1  # system, 7 turns, header
    assert tokenizer.decode(row["chosen_ids"]) == records[multi_turn]["chosen"]["value"] + "<|im_end|>"


def test_the_same_pair_in_four_layouts_gives_the_same_ids(tokenizer, tmp_path: Path) -> None:
    rows = []
    for layout, record in LAYOUTS.items():
        path = write(tmp_path / f"{layout}.json", [record])
        rows.append(
            {
                key: value
                for key, value in pair_data(tokenizer, path, tmp_path).train_dataset[0].items()
                if key != "id"
            }
        )
    assert all(row == rows[0] for row in rows)


# -------------------------------------------------------------------------------- over-long pairs


def long_pair(tokenizer) -> tuple[dict, dict[str, int]]:
    record = {
        "conversations": [
            {"from": "human", "value": "first question " * 8},
            {"from": "gpt", "value": "first answer " * 8},
            {"from": "human", "value": "second question"},
        ],
        "chosen": {"from": "gpt", "value": "yes"},
        "rejected": {"from": "gpt", "value": "no, not at all"},
    }
    sizes = {
        "system": len(turn(tokenizer, "system", DEFAULT_SYSTEM)),
        "exchange": len(turn(tokenizer, "user", "first question " * 8))
        + len(turn(tokenizer, "assistant", "first answer " * 8)),
        "last": len(turn(tokenizer, "user", "second question")) + len(answer_header(tokenizer)),
        "answer": len(tokenizer.encode_text("no, not at all")) + 1,
    }
    return record, sizes


def test_drop_turns_drops_prompt_turns_from_the_front_and_keeps_the_answers(
    tokenizer, tmp_path: Path
) -> None:
    record, sizes = long_pair(tokenizer)
    path = write(tmp_path / "long.json", [record])
    full = sizes["system"] + sizes["exchange"] + sizes["last"] + sizes["answer"]
    data = pair_data(tokenizer, path, tmp_path, max_length=full - 1)
    [row] = list(data.train_dataset)
    assert row["prompt_ids"] == [
        *turn(tokenizer, "system", DEFAULT_SYSTEM),
        *turn(tokenizer, "user", "second question"),
        *answer_header(tokenizer),
    ]
    assert row["rejected_ids"] == [*tokenizer.encode_text("no, not at all"), IM_END]
    assert data.report["train"]["truncated"] == 1
    assert pair_data(tokenizer, path, tmp_path, max_length=full).report["train"]["truncated"] == 0


def test_cut_keeps_the_end_of_the_prompt(tokenizer, tmp_path: Path) -> None:
    record, sizes = long_pair(tokenizer)
    path = write(tmp_path / "long.json", [record])
    max_length = sizes["last"] + sizes["answer"] + 5
    [row] = list(pair_data(tokenizer, path, tmp_path, max_length=max_length, truncation="cut").train_dataset)
    untruncated = list(pair_data(tokenizer, path, tmp_path, max_length=4096).train_dataset)[0]
    assert row["prompt_ids"] == untruncated["prompt_ids"][-(max_length - sizes["answer"]) :]
    assert (
        row["chosen_ids"] == untruncated["chosen_ids"] and row["rejected_ids"] == untruncated["rejected_ids"]
    )


def test_pairs_whose_answers_cannot_fit_are_skipped_and_counted(tokenizer, tmp_path: Path) -> None:
    record, sizes = long_pair(tokenizer)
    fits = {"conversations": [{"from": "human", "value": "ok?"}], "chosen": "ok", "rejected": "no"}
    path = write(tmp_path / "pairs.json", [record, fits])
    # the system turn, the last question and the longer answer do not fit, but the answer alone does
    drop = pair_data(
        tokenizer, path, tmp_path, max_length=sizes["system"] + sizes["last"] + sizes["answer"] - 1
    )
    assert [row["id"] for row in drop.train_dataset] == ["pairs.json:1"]
    assert drop.report["train"]["skipped"][SKIP_PROMPT_TOO_LONG]["example_ids"] == ["pairs.json:0"]
    # with cut the same pair fits, with its prompt cut from the left
    cut = pair_data(
        tokenizer,
        path,
        tmp_path,
        max_length=sizes["system"] + sizes["last"] + sizes["answer"] - 1,
        truncation="cut",
    )
    assert len(cut.train_dataset) == 2
    # an answer that does not fit even with an empty prompt is skipped under either policy
    max_length = len(answer_header(tokenizer)) + 4
    cut = pair_data(tokenizer, path, tmp_path, max_length=max_length, truncation="cut")
    stats = cut.report["train"]
    assert (stats["samples_read"], stats["samples_kept"], stats["samples_skipped"]) == (2, 1, 1)
    assert stats["skipped"][SKIP_ANSWER_TOO_LONG]["example_ids"] == ["pairs.json:0"]
    assert [row["id"] for row in cut.train_dataset] == ["pairs.json:1"]
    with pytest.raises(DataError, match=r"all 2 were skipped \(answer_too_long: 1, prompt_too_long: 1\)"):
        pair_data(tokenizer, path, tmp_path, max_length=max_length)


def test_no_pair_left_is_an_error(tokenizer, tmp_path: Path) -> None:
    record, _ = long_pair(tokenizer)
    with pytest.raises(
        DataError, match=r"no train sample is left: all 1 were skipped \(answer_too_long: 1\)"
    ):
        pair_data(tokenizer, write(tmp_path / "long.json", [record]), tmp_path, max_length=4)


# -------------------------------------------------------------------------- report, cache, check_data


def test_report_counts_pairs_and_their_tokens(tokenizer, tmp_path: Path, capsys) -> None:
    path = write(
        tmp_path / "pairs.json",
        [LAYOUTS["sharegpt"], {"prompt": "Why?", "chosen": "So.", "rejected": "No."}] * 2,
    )
    with pytest.raises(DataError, match="mixed formats"):
        pair_data(tokenizer, path, tmp_path)
    path = write(
        tmp_path / "pairs.json", [LAYOUTS["trl"], {"prompt": "Why?", "chosen": "So.", "rejected": "No."}] * 2
    )
    data = pair_data(tokenizer, path, tmp_path, eval_split_ratio=0.25)
    report = data.report
    assert report["settings"]["kind"] == "preference"
    rows = list(data.train_samples)
    stats = report["train"]
    assert (stats["samples_read"], stats["samples_kept"], report["eval"]["samples_kept"]) == (3, 3, 1)
    assert stats["prompt_tokens"] == sum(len(row["prompt_ids"]) for row in rows)
    assert stats["chosen_tokens"] == sum(len(row["chosen_ids"]) for row in rows)
    assert stats["rejected_tokens"] == sum(len(row["rejected_ids"]) for row in rows)
    assert (
        stats["total_tokens"]
        == 2 * stats["prompt_tokens"] + stats["chosen_tokens"] + stats["rejected_tokens"]
    )
    assert stats["length"]["max"] == max(row["length"] for row in rows)
    printed = capsys.readouterr().out
    assert "preference pairs" in printed and "train: 3 pairs read, 3 kept, 0 skipped" in printed


def test_cache_is_reused_and_keyed_by_the_options(tokenizer, tmp_path: Path) -> None:
    path = write(tmp_path / "pairs.json", [{"prompt": "Why?", "chosen": "So.", "rejected": "No."}])
    first = pair_data(tokenizer, path, tmp_path)
    again = pair_data(tokenizer, path, tmp_path)
    other = pair_data(tokenizer, path, tmp_path, system_message="Other.")
    assert not first.report["settings"]["from_cache"] and again.report["settings"]["from_cache"]
    assert not other.report["settings"]["from_cache"]
    assert list(first.train_dataset) == list(again.train_dataset) != list(other.train_dataset)


def test_check_data_dumps_both_full_sequences_of_each_pair(tokenizer, tmp_path: Path) -> None:
    path = write(
        tmp_path / "pairs.json", [LAYOUTS["trl"], {"prompt": "Why?", "chosen": "So.", "rejected": "No."}]
    )
    dump = tmp_path / "dump.jsonl"
    args = DataArguments(
        data_path=str(path), data_cache_dir=str(tmp_path / "cache"), check_data=True, dump_encoded=str(dump)
    )
    assert run_check_data(args, tokenizer, 512, tmp_path / "out", kind="preference") == 0
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    rows = list(pair_data(tokenizer, path, tmp_path).train_samples)
    assert [line["id"] for line in lines] == [row["id"] for row in rows]
    for line, row in zip(lines, rows):
        assert set(line) == {
            "id",
            "chosen_input_ids",
            "chosen_labels",
            "rejected_input_ids",
            "rejected_labels",
        }
        for answer in ("chosen", "rejected"):
            prompt = len(row["prompt_ids"])
            assert line[f"{answer}_input_ids"] == row["prompt_ids"] + row[f"{answer}_ids"]
            assert line[f"{answer}_labels"] == [IGNORE_INDEX] * prompt + row[f"{answer}_ids"]
    assert json.loads((tmp_path / "out" / "data_stats.json").read_text())["settings"]["kind"] == "preference"


def test_check_data_on_a_bad_pair_returns_1(tokenizer, tmp_path: Path, capsys) -> None:
    path = write(
        tmp_path / "bad.json",
        [{"prompt": "Why?", "chosen": "So.", "rejected": [{"role": "user", "content": "?"}]}],
    )
    args = DataArguments(data_path=str(path), data_cache_dir=str(tmp_path / "cache"), check_data=True)
    assert run_check_data(args, tokenizer, 512, None, kind="preference") == 1
    assert (
        "bad.json: sample 0: field 'rejected[0]': an answer is one assistant message"
        in capsys.readouterr().err
    )


def test_lazy_preprocess_is_refused_for_pairs(tokenizer, tmp_path: Path) -> None:
    path = write(tmp_path / "pairs.json", [LAYOUTS["trl"]])
    with pytest.raises(ArgumentError, match="--lazy_preprocess"):
        pair_data(tokenizer, path, tmp_path, lazy_preprocess=True)


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("record", "field", "problem"),
    [
        (
            {
                "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
                "chosen": "x",
                "rejected": "y",
            },
            "conversations",
            "the prompt must end with a user turn",
        ),
        ({"prompt": [], "chosen": "x", "rejected": "y"}, "prompt", "the prompt is empty"),
        ({"prompt": "Q", "chosen": 3, "rejected": "y"}, "chosen", "a message must be an object"),
        (
            {
                "prompt": "Q",
                "chosen": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}],
                "rejected": "y",
            },
            "chosen",
            "an answer is one assistant message or one or more tool calls",
        ),
        (
            {
                "messages": [{"role": "user", "content": "Q"}],
                "chosen": {"role": "tool", "content": "1"},
                "rejected": "y",
            },
            "chosen",
            "an answer is one assistant message",
        ),
        (
            {
                "conversations": [{"from": "human", "value": "Q"}],
                "chosen": {"from": "bot", "value": "x"},
                "rejected": "y",
            },
            "chosen.from",
            "unknown role 'bot'",
        ),
    ],
)
def test_bad_pairs_name_file_sample_field_and_fix(
    tmp_path: Path, record: dict, field: str, problem: str
) -> None:
    path = write(tmp_path / "bad.json", [{"id": "p1", **record}])
    with pytest.raises(DataError) as caught:
        load_pair_file(path)
    error = caught.value
    assert (Path(error.file).name, error.index, error.sample_id, error.field) == ("bad.json", 0, "p1", field)
    assert problem in error.problem and error.fix


def test_pairs_and_conversations_are_not_mistaken_for_each_other(tokenizer, tmp_path: Path) -> None:
    pairs = write(tmp_path / "pairs.json", [LAYOUTS["sharegpt"]])
    with pytest.raises(
        DataError, match="is a preference pair .* Fix: train preference pairs with a preference stage"
    ):
        make_supervised_data(
            DataArguments(data_path=str(pairs), data_cache_dir=str(tmp_path / "c")), tokenizer, 512
        )
    conversation = write(
        tmp_path / "sft.json",
        [{"conversations": [{"from": "user", "value": "Q"}, {"from": "assistant", "value": "A"}]}],
    )
    with pytest.raises(DataError, match="not a preference pair"):
        load_pair_file(conversation)
    with pytest.raises(DataError, match="--data_format alpaca has no preference pair layout"):
        load_pair_file(pairs, "alpaca")
    with pytest.raises(DataError, match="--data_format trl has no conversation layout"):
        make_supervised_data(
            DataArguments(data_path=str(conversation), data_format="trl", data_cache_dir=str(tmp_path / "c")),
            tokenizer,
            512,
        )
    with pytest.raises(
        DataError, match=r"give each sample the key\(s\) 'messages' \+ 'chosen' \+ 'rejected'"
    ):
        load_pair_file(pairs, "openai")

"""Datasets, cache, eval split, lazy mode, report numbers and --check_data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen_finetune.data import DataArguments, DataError, make_supervised_data, run_check_data
from qwen_finetune.data.chatml import IGNORE_INDEX
from qwen_finetune.data.dataset import encode_files
from qwen_finetune.data.report import padding_efficiency
from qwen_finetune.errors import ArgumentError

FIXTURES = Path(__file__).parent / "fixtures" / "data"
QWEN_CHAT = str(FIXTURES / "qwen_chat.json")
ALPACA = str(FIXTURES / "alpaca_history.json")
EXAMPLE = str(Path(__file__).resolve().parent.parent / "data" / "example.json")


def data_args(tmp_path: Path, **overrides) -> DataArguments:
    options = {"data_path": QWEN_CHAT, "data_cache_dir": str(tmp_path / "cache")}
    options.update(overrides)
    return DataArguments(**options)


def rows(dataset) -> list[tuple[str, list[int], list[int]]]:
    return [(row["id"], list(row["input_ids"]), list(row["labels"])) for row in dataset]


# ------------------------------------------------------------------------------------ datasets + cache


def test_several_files_give_one_training_set_with_a_length_column(tokenizer, tmp_path: Path) -> None:
    data = make_supervised_data(data_args(tmp_path, data_path=f"{QWEN_CHAT}, {ALPACA}"), tokenizer, 512)
    assert data.eval_dataset is None
    assert len(data.train_dataset) == 5
    assert set(data.train_dataset.column_names) == {"id", "input_ids", "labels", "length"}
    assert [row["id"] for row in data.train_dataset] == [
        "greeting",
        "with_system",
        "leading_assistant",
        "alpaca_history.json:0",
        "alpaca_history.json:1",
    ]
    assert [row["length"] for row in data.train_dataset] == [
        len(row["input_ids"]) for row in data.train_dataset
    ]
    assert [file["format"] for file in data.report["files"]] == ["qwen", "alpaca"]
    assert data.report["files"][0]["leading_turns_dropped"] == 1


def test_cache_is_reused_and_keyed_by_contents_and_options(tokenizer, tmp_path: Path) -> None:
    source = tmp_path / "data.json"
    source.write_text(Path(QWEN_CHAT).read_text())
    args = data_args(tmp_path, data_path=str(source))
    first = make_supervised_data(args, tokenizer, 512)
    second = make_supervised_data(args, tokenizer, 512)
    assert not first.report["settings"]["from_cache"]
    assert second.report["settings"]["from_cache"]
    assert rows(first.train_dataset) == rows(second.train_dataset)

    renamed = tmp_path / "renamed.json"
    source.rename(renamed)
    same_bytes = make_supervised_data(data_args(tmp_path, data_path=str(renamed)), tokenizer, 512)
    assert same_bytes.report["settings"]["from_cache"]

    records = json.loads(renamed.read_text())
    records[0]["conversations"][1]["value"] = "A different answer."
    renamed.write_text(json.dumps(records))
    changed = make_supervised_data(data_args(tmp_path, data_path=str(renamed)), tokenizer, 512)
    assert not changed.report["settings"]["from_cache"]
    assert rows(changed.train_dataset)[0] != rows(first.train_dataset)[0]

    other_policy = make_supervised_data(data_args(tmp_path, label_policy="assistant_only"), tokenizer, 512)
    assert not other_policy.report["settings"]["from_cache"]
    entries = os.listdir(tmp_path / "cache")
    assert len(entries) == 3
    assert not [name for name in entries if name.startswith(".")]  # no half-written entry left


def test_two_workers_give_the_same_encoding_as_one(tokenizer, tmp_path: Path) -> None:
    one = make_supervised_data(data_args(tmp_path / "a", data_path=EXAMPLE), tokenizer, 512)
    two = make_supervised_data(
        data_args(tmp_path / "b", data_path=EXAMPLE, preprocessing_num_workers=2), tokenizer, 512
    )
    assert rows(one.train_dataset) == rows(two.train_dataset)


def test_eval_split_is_fixed_disjoint_and_complete(tokenizer, tmp_path: Path) -> None:
    args = data_args(tmp_path, data_path=EXAMPLE, eval_split_ratio=0.25)
    data = make_supervised_data(args, tokenizer, 512)
    train_ids = [row["id"] for row in data.train_dataset]
    eval_ids = [row["id"] for row in data.eval_dataset]
    assert len(eval_ids) == round(34 * 0.25)
    assert not set(train_ids) & set(eval_ids)
    assert sorted(train_ids + eval_ids) == [f"miko_{index:02d}" for index in range(34)]
    assert data.report["eval"]["samples_read"] == len(eval_ids)
    again = make_supervised_data(args, tokenizer, 512)
    assert [row["id"] for row in again.eval_dataset] == eval_ids


def test_eval_data_path_is_encoded_and_reported(tokenizer, tmp_path: Path) -> None:
    data = make_supervised_data(data_args(tmp_path, eval_data_path=ALPACA), tokenizer, 512)
    assert [row["id"] for row in data.eval_dataset] == ["alpaca_history.json:0", "alpaca_history.json:1"]
    assert data.report["eval"]["samples_kept"] == 2
    assert [file["path"] for file in data.report["files"]] == [QWEN_CHAT, ALPACA]


def test_lazy_preprocess_encodes_the_same_samples(tokenizer, tmp_path: Path) -> None:
    cached = make_supervised_data(data_args(tmp_path, data_path=EXAMPLE), tokenizer, 512)
    lazy = make_supervised_data(data_args(tmp_path, data_path=EXAMPLE, lazy_preprocess=True), tokenizer, 512)
    assert [(item["id"], item["input_ids"], item["labels"]) for item in lazy.train_dataset] == rows(
        cached.train_dataset
    )
    assert "no token statistics" in lazy.report["train"]["note"]


def test_lazy_preprocess_masks_a_sample_with_nothing_to_learn(tokenizer, tmp_path: Path) -> None:
    lazy = make_supervised_data(data_args(tmp_path, lazy_preprocess=True), tokenizer, 16)
    item = lazy.train_dataset[0]
    assert len(item["input_ids"]) == 16
    assert set(item["labels"]) == {IGNORE_INDEX}


def test_no_sample_left_is_an_error(tokenizer, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"no train sample is left: all 3 were skipped \(too_long: 3\)"):
        make_supervised_data(data_args(tmp_path), tokenizer, 16)
    with pytest.raises(DataError, match="no training data given"):
        make_supervised_data(DataArguments(), tokenizer, 16)


def _encode_in_rank(rank: int, cache_dir: str, init_file: str, vocab_file: str, results: str) -> None:
    from qwen_model.tokenization_qwen import QWenTokenizer

    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    os.environ["LOCAL_RANK"] = str(rank)
    encoded = encode_files(
        [EXAMPLE],
        QWenTokenizer(vocab_file=vocab_file),
        DataArguments().encoding_options(512),
        num_workers=None,
        cache_dir=Path(cache_dir),
    )
    Path(results, f"rank{rank}.json").write_text(
        json.dumps({"from_cache": encoded.from_cache, "ids": encoded.dataset["input_ids"][:3]})
    )
    torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_rank_zero_encodes_and_the_other_rank_reads_the_cache(vocab_file: Path, tmp_path: Path) -> None:
    torch.multiprocessing.spawn(
        _encode_in_rank,
        args=(str(tmp_path / "cache"), str(tmp_path / "init"), str(vocab_file), str(tmp_path)),
        nprocs=2,
    )
    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert (rank0["from_cache"], rank1["from_cache"]) == (False, True)
    assert rank0["ids"] == rank1["ids"]


# -------------------------------------------------------------------------------------------- report


def test_padding_efficiency_numbers() -> None:
    lengths = np.array([10, 20, 30, 40])
    efficiency = padding_efficiency(lengths, batch_size=2, max_length=50, pad_to_max_length=False)
    assert efficiency["pad_to_max"] == 0.5  # 100 real tokens / (4 rows x 50)
    assert efficiency["packed_rows"] == 2  # (40 + 10), (30 + 20)
    assert efficiency["packed"] == 1.0
    best, worst = (
        100 / (2 * 40 + 2 * 20),
        100 / (2 * 40 + 2 * 30),
    )  # batches (40, 30), (20, 10) / (40, 10), (30, 20)
    for mode in ("dynamic", "grouped"):
        assert round(worst, 4) <= efficiency[mode] <= round(best, 4)
    padded_rows = padding_efficiency(lengths, batch_size=2, max_length=64, pad_to_max_length=True)
    assert padded_rows["packed"] == round(100 / (2 * 64), 4)


def test_length_grouping_and_packing_beat_random_batches_on_varied_lengths() -> None:
    lengths = np.random.default_rng(1).integers(10, 500, size=2000)
    efficiency = padding_efficiency(lengths, batch_size=8, max_length=512, pad_to_max_length=False)
    assert efficiency["pad_to_max"] == round(lengths.sum() / (2000 * 512), 4)
    assert efficiency["dynamic"] < 0.7 < 0.9 < efficiency["grouped"]
    assert efficiency["packed"] > 0.95
    assert efficiency["packed_rows"] * 512 >= lengths.sum()


def test_report_counts_and_tokens(tokenizer, tmp_path: Path) -> None:
    args = data_args(tmp_path, truncation="cut", label_policy="assistant_only")
    data = make_supervised_data(args, tokenizer, 36, per_device_batch_size=3, output_dir=tmp_path / "out")
    report = data.report
    written = json.loads((tmp_path / "out" / "data_stats.json").read_text())
    assert written == json.loads(json.dumps(report))
    kept = rows(data.train_samples)
    stats = report["train"]
    assert stats["samples_read"] == 3
    assert stats["samples_kept"] == len(kept)
    assert stats["samples_skipped"] == 3 - len(kept)
    assert sum(detail["count"] for detail in stats["skipped"].values()) == stats["samples_skipped"]
    lengths = [len(ids) for _, ids, _ in kept]
    assert stats["total_tokens"] == sum(lengths)
    assert stats["supervised_tokens"] == sum(
        sum(1 for label in labels[1:] if label != IGNORE_INDEX) for _, _, labels in kept
    )
    assert stats["truncated"] == sum(length == 36 for length in lengths)
    assert stats["length"]["max"] == max(lengths)
    assert stats["padding_efficiency"]["pad_to_max"] == round(sum(lengths) / (len(lengths) * 36), 4)


def test_report_of_a_long_file_lists_skips_and_truncations(tokenizer, tmp_path: Path, capsys) -> None:
    make_supervised_data(data_args(tmp_path, data_path=EXAMPLE), tokenizer, 64)
    printed = capsys.readouterr().out
    assert "Data report (model_max_length 64" in printed
    assert "skipped too_long" in printed
    assert "padding efficiency (batch size 1)" in printed
    assert "dynamic" in printed and "<- this run" in printed


# ----------------------------------------------------------------------------------------- check_data


def test_check_data_dumps_kept_samples_and_the_report(tokenizer, tmp_path: Path) -> None:
    dump = tmp_path / "encoded.jsonl"
    args = data_args(tmp_path, check_data=True, dump_encoded=str(dump))
    assert run_check_data(args, tokenizer, 512, str(tmp_path / "out")) == 0
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    reference = make_supervised_data(data_args(tmp_path), tokenizer, 512)
    assert [(line["id"], line["input_ids"], line["labels"]) for line in lines] == rows(
        reference.train_samples
    )
    assert set(lines[0]) == {"id", "input_ids", "labels"}
    assert (tmp_path / "out" / "data_stats.json").is_file()
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]


def test_check_data_on_bad_data_returns_1_and_writes_nothing(tokenizer, tmp_path: Path, capsys) -> None:
    dump = tmp_path / "encoded.jsonl"
    args = data_args(
        tmp_path,
        data_path=str(FIXTURES / "bad" / "unknown_role.json"),
        check_data=True,
        dump_encoded=str(dump),
    )
    assert run_check_data(args, tokenizer, 512, str(tmp_path / "out")) == 1
    error = capsys.readouterr().err
    assert "unknown_role.json: sample 0 (id 'r1'): field 'conversations[1].from': unknown role 'bot'" in error
    assert not dump.exists()
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- flags


def test_every_data_flag_parses_from_the_command_line(tmp_path: Path) -> None:
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(DataArguments).parse_args_into_dataclasses(
        [
            "--data_path", "a.json,b.jsonl", "--eval_data_path", "c.json", "--lazy_preprocess",
            "--data_format", "sharegpt", "--system_message", "Hi.", "--label_policy", "assistant_only",
            "--truncation", "cut", "--allow_special_tokens_in_data", "--pad_to_max_length",
            "--preprocessing_num_workers", "2", "--data_cache_dir", str(tmp_path), "--check_data",
            "--dump_encoded", "out.jsonl",
        ]
    )  # fmt: skip
    assert args.train_files == ["a.json", "b.jsonl"] and args.eval_files == ["c.json"]
    assert (args.data_format, args.label_policy, args.truncation) == ("sharegpt", "assistant_only", "cut")
    assert (
        args.lazy_preprocess
        and args.allow_special_tokens_in_data
        and args.pad_to_max_length
        and args.check_data
    )
    assert args.preprocessing_num_workers == 2 and args.resolved_cache_dir == tmp_path
    with pytest.raises(SystemExit):
        HfArgumentParser(DataArguments).parse_args_into_dataclasses(["--label_policy", "everything"])


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"packing": True, "lazy_preprocess": True}, "--packing needs every sample's length"),
        ({"eval_split_ratio": 0.1, "eval_data_path": "x.json"}, "give only one"),
        ({"eval_split_ratio": 1.0}, "must be in"),
        ({"dump_encoded": "x.jsonl"}, "add --check_data"),
        ({"truncation": "middle"}, "is not one of drop_turns, cut"),
    ],
)
def test_flag_combinations_that_cannot_work(options: dict, message: str) -> None:
    with pytest.raises(ArgumentError, match=message):
        DataArguments(**options)


def test_a_report_written_without_the_kind_setting_still_formats() -> None:
    """data_stats.json files of earlier runs have no settings.kind: they are conversation reports."""
    from qwen_finetune.data.report import format_report

    settings = {"model_max_length": 64, "label_policy": "qwen", "truncation": "cut", "batching": "dynamic"}
    stats = {"samples_read": 2, "samples_kept": 2, "samples_skipped": 0, "skipped": {}}
    text = format_report({"settings": settings, "files": [], "train": stats})
    assert text.splitlines() == [
        "Data report (model_max_length 64, label_policy qwen, truncation cut, batching dynamic)",
        "  train: 2 samples read, 2 kept, 0 skipped",
    ]

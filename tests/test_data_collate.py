"""Batches: dynamic padding, padding to max length, and packed rows with restarting positions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qwen_finetune.data import DataArguments, make_supervised_data
from qwen_finetune.data.chatml import IGNORE_INDEX
from qwen_finetune.data.collate import ROW_LENGTHS, SupervisedCollator
from qwen_finetune.data.packing import pack_lengths, pack_samples

EXAMPLE = str(Path(__file__).resolve().parent.parent / "data" / "example.json")
EOD = 151643


def features(*lengths: int) -> list[dict[str, list[int]]]:
    return [
        {"input_ids": [100 + row * 10 + i for i in range(length)], "labels": list(range(1000, 1000 + length))}
        for row, length in enumerate(lengths)
    ]


def test_dynamic_padding_pads_right_to_the_longest_row() -> None:
    batch = SupervisedCollator(pad_token_id=EOD)(features(3, 5))
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].tolist() == [[100, 101, 102, EOD, EOD], [110, 111, 112, 113, 114]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, 1001, 1002, IGNORE_INDEX, IGNORE_INDEX],
        [IGNORE_INDEX, 1001, 1002, 1003, 1004],
    ]
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long


def test_pad_to_max_length_pads_every_row_to_model_max_length() -> None:
    batch = SupervisedCollator(pad_token_id=EOD, pad_to_length=8)(features(3, 5))
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 8)
    assert batch["attention_mask"].sum(dim=1).tolist() == [3, 5]
    with pytest.raises(ValueError, match="more than the padding length 4"):
        SupervisedCollator(pad_token_id=EOD, pad_to_length=4)(features(3, 5))


def test_packed_row_restarts_positions_and_masks_each_first_label() -> None:
    first, second = features(3, 4)
    row = pack_samples([first["input_ids"], second["input_ids"]], [first["labels"], second["labels"]])
    assert row["input_ids"] == first["input_ids"] + second["input_ids"]
    assert row["position_ids"] == [0, 1, 2, 0, 1, 2, 3]
    assert row["labels"] == [IGNORE_INDEX, 1001, 1002, IGNORE_INDEX, 1001, 1002, 1003]


def test_packed_batch_padding_is_its_own_segment_without_attention_mask() -> None:
    rows = [pack_samples([[1, 2, 3], [4, 5]], [[1, 2, 3], [4, 5]]), pack_samples([[6, 7]], [[6, 7]])]
    batch = SupervisedCollator(pad_token_id=EOD)(rows)
    assert set(batch) == {"input_ids", "labels", "position_ids", ROW_LENGTHS}
    assert batch[ROW_LENGTHS].tolist() == [5, 2]  # the real tokens of each row, for token accounting
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, EOD, EOD, EOD]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch["labels"].tolist() == [
        [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5],
        [IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
    ]
    padded = SupervisedCollator(pad_token_id=EOD, pad_to_length=7)(rows)
    assert padded["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 1, 0, 1, 2, 3, 4]]
    assert padded[ROW_LENGTHS].tolist() == [5, 2]


def test_pack_lengths_fills_rows_without_overflow_and_uses_every_sample_once() -> None:
    lengths = [7, 3, 9, 1, 5, 5, 2, 8, 10, 4]
    rows = pack_lengths(lengths, 10)
    assert sorted(index for row in rows for index in row) == list(range(len(lengths)))
    assert all(sum(lengths[index] for index in row) <= 10 for row in rows)
    assert len(rows) == 6  # 54 tokens need at least 6 rows of 10
    with pytest.raises(ValueError, match="more than the row capacity"):
        pack_lengths([11], 10)


def test_packed_dataset_rows_hold_the_kept_samples_unchanged(tokenizer, tmp_path: Path) -> None:
    args = DataArguments(data_path=EXAMPLE, packing=True, data_cache_dir=str(tmp_path))
    data = make_supervised_data(args, tokenizer, 256, per_device_batch_size=2)
    samples = {tuple(row["input_ids"]): list(row["labels"]) for row in data.train_samples}
    assert len(data.train_dataset) < len(samples)
    seen = 0
    for index in range(len(data.train_dataset)):
        row = data.train_dataset[index]
        assert len(row["input_ids"]) <= 256
        starts = [position for position, value in enumerate(row["position_ids"]) if value == 0]
        for start, end in zip(starts, [*starts[1:], len(row["input_ids"])]):
            ids = tuple(row["input_ids"][start:end])
            assert row["position_ids"][start:end] == list(range(end - start))
            assert row["labels"][start:end] == [IGNORE_INDEX, *samples[ids][1:]]
            seen += 1
    assert seen == len(samples)
    batch = data.data_collator([data.train_dataset[0], data.train_dataset[1]])
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape

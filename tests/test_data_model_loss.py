"""With the tiny model: packing and padding modes change nothing about the loss.

Per-sample losses from packed rows equal those of the samples run alone, and the batch loss (mean
over supervised tokens) is the same with dynamic padding, padding to max length and packing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from qwen_finetune.data import DataArguments, make_supervised_data
from qwen_finetune.data.chatml import IGNORE_INDEX
from qwen_finetune.train import model_inputs

EXAMPLE = str(Path(__file__).resolve().parent.parent / "data" / "example.json")
MAX_LENGTH = 128
SAMPLES = 12


@pytest.fixture(scope="module")
def model(tiny_chat_checkpoint: Path):
    from qwen_model import QWenLMHeadModel

    loaded = QWenLMHeadModel.from_pretrained(tiny_chat_checkpoint, dtype=torch.float32)
    return loaded.eval()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first conversations of data/example.json (single- and multi-turn, Chinese and English)."""
    records = json.loads(Path(EXAMPLE).read_text())[:SAMPLES]
    path = tmp_path_factory.mktemp("data") / "subset.json"
    path.write_text(json.dumps(records, ensure_ascii=False))
    return path


def supervised_data(tokenizer, data_file: Path, cache_dir: Path, **options):
    args = DataArguments(data_path=str(data_file), data_cache_dir=str(cache_dir), **options)
    return make_supervised_data(args, tokenizer, MAX_LENGTH, per_device_batch_size=4)


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Next-token cross entropy summed over supervised positions of one row, and their count."""
    targets = labels[1:]
    supervised = targets != IGNORE_INDEX
    total = F.cross_entropy(logits[:-1][supervised].float(), targets[supervised], reduction="sum")
    return total, int(supervised.sum())


@torch.no_grad()
def test_packed_per_sample_losses_equal_unpacked(model, tokenizer, data_file: Path, tmp_path: Path) -> None:
    plain = supervised_data(tokenizer, data_file, tmp_path)
    packed = supervised_data(tokenizer, data_file, tmp_path, packing=True)
    alone: dict[tuple[int, ...], tuple[float, int]] = {}
    for feature in plain.train_dataset:
        batch = plain.data_collator([feature])
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], skip_logits=False
        ).logits
        total, count = loss_sum(logits[0], batch["labels"][0])
        alone[tuple(feature["input_ids"])] = (total.item(), count)

    rows = [packed.train_dataset[index] for index in range(len(packed.train_dataset))]
    assert len(rows) < len(alone)
    batch = packed.data_collator(rows)
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], skip_logits=False).logits
    compared = 0
    for row_index, row in enumerate(rows):
        starts = [index for index, position in enumerate(row["position_ids"]) if position == 0]
        for start, end in zip(starts, [*starts[1:], len(row["input_ids"])]):
            total, count = loss_sum(logits[row_index, start:end], batch["labels"][row_index, start:end])
            expected_total, expected_count = alone[tuple(row["input_ids"][start:end])]
            assert count == expected_count
            assert total.item() == pytest.approx(expected_total, rel=1e-4, abs=1e-4)
            compared += 1
    assert compared == len(alone)


@torch.no_grad()
def test_batch_loss_is_the_same_with_dynamic_padding_max_padding_and_packing(
    model, tokenizer, data_file: Path, tmp_path: Path
) -> None:
    dynamic = supervised_data(tokenizer, data_file, tmp_path)
    to_max = supervised_data(tokenizer, data_file, tmp_path, pad_to_max_length=True)
    packed = supervised_data(tokenizer, data_file, tmp_path, packing=True)
    features = list(dynamic.train_dataset)

    dynamic_batch = dynamic.data_collator(features)
    max_batch = to_max.data_collator(features)
    assert max_batch["input_ids"].shape[1] == MAX_LENGTH > dynamic_batch["input_ids"].shape[1]
    dynamic_loss = model(**dynamic_batch, skip_logits=True).loss
    assert model(**max_batch, skip_logits=True).loss.item() == pytest.approx(dynamic_loss.item(), rel=1e-5)

    packed_batch = packed.data_collator(
        [packed.train_dataset[index] for index in range(len(packed.train_dataset))]
    )
    assert packed_batch["input_ids"].shape[0] < len(features)
    supervised = (dynamic_batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    assert (packed_batch["labels"][:, 1:] != IGNORE_INDEX).sum() == supervised
    packed_loss = model(**model_inputs(packed_batch), skip_logits=True).loss
    assert packed_loss.item() == pytest.approx(dynamic_loss.item(), rel=1e-4)

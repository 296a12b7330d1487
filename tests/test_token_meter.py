"""Token accounting: the logged tokens_seen counts real tokens, never the padding of a batch, for plain
and packed batches alike; the collator's bookkeeping entry (packed row lengths) never reaches the model."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
import train_helpers as helpers
from transformers import TrainerCallback

from qwen_finetune.args import parse_run_arguments
from qwen_finetune.data import DataArguments, make_supervised_data
from qwen_finetune.data.chatml import IGNORE_INDEX
from qwen_finetune.data.collate import ROW_LENGTHS, SupervisedCollator
from qwen_finetune.data.packing import pack_samples
from qwen_finetune.model_loading import load_tokenizer
from qwen_finetune.run_metrics import TokenMeter
from qwen_finetune.train import model_inputs, train

EOD = 151643


def counted(batch: dict[str, torch.Tensor]) -> list[int]:
    """[real tokens, supervised tokens] as the meter counts them for one batch."""
    meter = TokenMeter()
    meter.count(batch)
    return meter.pending.tolist()


def test_packed_batch_counts_real_tokens_not_padding() -> None:
    rows = [
        pack_samples([[1, 2, 3], [4, 5, 6, 7]], [[1, 2, 3], [IGNORE_INDEX, 5, 6, 7]]),  # 7 tokens
        pack_samples([[8, 9]], [[8, 9]]),  # 2 tokens
        pack_samples([[EOD, 10, EOD]], [[EOD, 10, EOD]]),  # 3 tokens, two of them the pad id
    ]
    for pad_to_length in (None, 12):
        batch = SupervisedCollator(pad_token_id=EOD, pad_to_length=pad_to_length)(rows)
        assert "attention_mask" not in batch
        assert batch["input_ids"].numel() == 3 * (pad_to_length or 7)
        # supervised: 2 + 3 (each sample's first label is masked), 1, 2
        assert counted(batch) == [7 + 2 + 3, 2 + 3 + 1 + 2]


def test_plain_padded_batch_counts_real_tokens_not_padding() -> None:
    features = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8, EOD, 9, 10, EOD], "labels": [8, EOD, IGNORE_INDEX, 10, EOD]},
    ]
    for pad_to_length in (None, 9):
        batch = SupervisedCollator(pad_token_id=EOD, pad_to_length=pad_to_length)(features)
        assert ROW_LENGTHS not in batch
        assert counted(batch) == [3 + 5, 2 + 3]


def test_model_inputs_drop_the_row_lengths_and_keep_everything_else() -> None:
    batch = SupervisedCollator(pad_token_id=EOD)([pack_samples([[1, 2], [3]], [[1, 2], [3]])])
    inputs = model_inputs({**batch, "skip_logits": True})
    assert set(inputs) == {"input_ids", "labels", "position_ids", "skip_logits"}
    assert inputs["input_ids"] is batch["input_ids"] and ROW_LENGTHS in batch  # the batch is not changed


class ForwardRecorder(TrainerCallback):
    """Records the keyword arguments (those not None) every forward of the Qwen model receives, in
    training and in evaluation."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, set[str]]] = []  # (training, keyword names)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        qwen = next(module for module in model.modules() if type(module).__name__ == "QWenLMHeadModel")
        qwen.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        self.calls.append((module.training, {name for name, value in kwargs.items() if value is not None}))


@pytest.mark.slow
def test_packed_training_with_two_rows_per_batch_counts_real_tokens(
    tiny_chat_checkpoint: Path, tmp_path: Path
) -> None:
    data_file = helpers.write_memorisable_data(tmp_path / "facts.json")
    cache = tmp_path / "data-cache"
    tokenizer = load_tokenizer(tiny_chat_checkpoint, helpers.MAX_LENGTH)
    arguments = DataArguments(data_path=str(data_file), packing=True, data_cache_dir=str(cache))
    data = make_supervised_data(arguments, tokenizer, helpers.MAX_LENGTH, per_device_batch_size=2)
    rows = [len(data.train_dataset[index]["input_ids"]) for index in range(len(data.train_dataset))]
    assert len(rows) >= 2 and len(set(rows)) > 1, rows  # rows of different lengths: batches hold padding
    samples = [data.train_samples[index] for index in range(len(data.train_samples))]
    real = sum(len(sample["input_ids"]) for sample in samples)
    supervised = sum(sum(label != IGNORE_INDEX for label in sample["labels"][1:]) for sample in samples)
    assert real == sum(rows)

    epochs = 3
    steps = epochs * math.ceil(len(rows) / 2)  # whole epochs: every packed row is trained on `epochs` times
    output = tmp_path / "lora-packed"
    argv = helpers.training_flags(
        tiny_chat_checkpoint,
        data_file,
        output,
        steps=steps,
        learning_rate=1e-2,
        cache_dir=cache,
        extra=["--use_lora", "--packing"],
    )
    recorder = ForwardRecorder()
    train(parse_run_arguments(argv), callbacks=[recorder])

    base = helpers.mean_supervised_loss(
        helpers.load_artifact(tiny_chat_checkpoint),
        helpers.encoded_batch(tiny_chat_checkpoint, data_file, cache),
    )
    helpers.assert_loss_fell(output, base)
    summary = helpers.summary(output)
    assert summary["global_steps"] == steps
    assert (summary["tokens_seen"], summary["supervised_tokens_seen"]) == (epochs * real, epochs * supervised)

    training = [names for is_training, names in recorder.calls if is_training]
    evaluation = [names for is_training, names in recorder.calls if not is_training]
    assert len(training) == steps and evaluation, recorder.calls
    assert all("position_ids" in names and "attention_mask" not in names for names in training + evaluation)
    assert not any(ROW_LENGTHS in names for names in training + evaluation)

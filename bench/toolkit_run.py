"""What bench/train_once.py runs once the flags are known: one configuration, trained for a fixed
number of steps through the toolkit's own path, and timed (see train_once.py)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn.functional as F
from configs import BenchConfig
from measure import RecordingCollator, StepTimer, TimedMicroBatches, measure, model_dimensions, start_timing
from memory import emit_result
from transformers import set_seed

from qwen_finetune.args import parse_run_arguments
from qwen_finetune.host_memory import keep_freed_memory
from qwen_finetune.lora_dropout import SampledDropout, lora_dropout_slots
from qwen_finetune.model_loading import load_model, load_tokenizer
from qwen_finetune.run_metrics import count_parameters
from qwen_finetune.train import QwenTrainer
from qwen_finetune.training_mode import choose_training_mode
from qwen_model.chunked_loss import IGNORE_INDEX


def original_recipe_loss(
    outputs: Any, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None
) -> torch.Tensor:
    """The loss as the original Qwen modeling computed it, with the memory that costs: the full logits,
    a contiguous copy shifted by one position, and cross entropy (log-softmax) over every position.

    Reduced as the toolkit reduces (sum over supervised targets / the step's count), so the loss values
    compare; the reduction does not change the memory or time.
    """
    logits = outputs.logits
    shifted_logits = logits[..., :-1, :].contiguous()
    shifted_labels = labels[..., 1:].contiguous().to(logits.device)
    total = F.cross_entropy(
        shifted_logits.view(-1, shifted_logits.shape[-1]),
        shifted_labels.view(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    count = num_items_in_batch if num_items_in_batch is not None else (shifted_labels != IGNORE_INDEX).sum()
    return total / count


class BenchTrainer(TimedMicroBatches, QwenTrainer):
    """QwenTrainer with timestamped micro-batches (see measure.py).

    With `original_loss`, training batches are run with skip_logits=False and their loss is
    `original_recipe_loss` (the baseline).
    """

    def __init__(self, *args: Any, original_loss: bool, **kwargs: Any) -> None:
        super().__init__(*args, compute_loss_func=original_recipe_loss if original_loss else None, **kwargs)
        self.original_loss = original_loss

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if model.training and self.original_loss:
            inputs = {**inputs, "skip_logits": False}
        return super().compute_loss(model, inputs, *args, **kwargs)


def train(config: BenchConfig, flags: list[str], profile: Path | None) -> None:
    """Train `config` with finetune.py's `flags` and print its result line (see memory.emit_result)."""
    logging.basicConfig(level=logging.WARNING)
    arguments = parse_run_arguments(flags)
    training_args, lora_args = arguments.training, arguments.lora

    started = time.perf_counter()
    mode = choose_training_mode(arguments.model, lora_args, training_args)
    tokenizer = load_tokenizer(mode.checkpoint.path, training_args.model_max_length)
    data = make_data(arguments.data, tokenizer, training_args, pairs=config.stage == "dpo")
    set_seed(training_args.seed)  # as qwen_finetune.train.train: new adapter weights are random
    if training_args.keeps_freed_memory and not config.is_baseline:  # the original recipe had no such setting
        keep_freed_memory()
    model = load_model(mode, lora_args, training_args)
    if config.is_baseline:
        restore_peft_dropout(model)
    rss_after_load = psutil.Process().memory_info().rss
    common = {
        "model": model,
        "args": training_args,
        "train_dataset": data.train_dataset,
        "data_collator": data.data_collator,
        "processing_class": tokenizer,
        "mode": mode,
    }
    trainer: Any
    if config.stage == "dpo":
        trainer = preference_trainer(arguments, mode, common)
    else:
        trainer = BenchTrainer(**common, original_loss=config.is_baseline)
    start_timing(trainer, RecordingCollator(data.data_collator))
    timer = StepTimer(config.steps if profile else None, profile)
    trainer.add_callback(timer)
    setup_seconds = time.perf_counter() - started
    metrics = trainer.train().metrics
    trainable, total = count_parameters(trainer.model)
    emit_result(
        {
            "config": config.to_dict(),
            "flags": flags,
            "plan": mode.describe(),
            "lora_rank": lora_args.lora_r,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "train_loss": metrics.get("train_loss"),
            "setup_seconds": setup_seconds,
            "rss_after_load_bytes": rss_after_load,
            "train_rows": len(data.train_dataset),
            "attention": getattr(model.config, "_attn_implementation", None),
            "model_dimensions": model_dimensions(model.config),
            "data": {
                key: data.report["train"][key]
                for key in ("samples_kept", "total_tokens", "supervised_tokens")
                if key in data.report["train"]
            },
            **measure(trainer, timer),
        }
    )


def restore_peft_dropout(model: torch.nn.Module) -> None:
    """The original recipe runs PEFT's own `nn.Dropout` in front of each adapter (bernoulli_ masks kept
    as float tensors), not the toolkit's CPU dropout that load_model puts there."""
    for dropouts, adapter, dropout in lora_dropout_slots(model):
        if isinstance(dropout, SampledDropout):
            dropouts[adapter] = torch.nn.Dropout(dropout.p)


def preference_trainer(arguments: Any, mode: Any, common: dict[str, Any]) -> Any:
    """The trainer of a `--stage dpo` run as qwen_finetune.train builds it, with timestamped micro-batches.

    Only LoRA runs here: their reference is the policy with its adapter switched off (no second model).
    """
    from qwen_finetune.preference.reference import choose_reference
    from qwen_finetune.preference.trainer import PreferenceTrainer

    class BenchPreferenceTrainer(TimedMicroBatches, PreferenceTrainer):
        """PreferenceTrainer with timestamped micro-batches (see measure.py)."""

    reference_kind = choose_reference(arguments.preference, mode, arguments.lora)
    if reference_kind != "adapter_disabled":
        raise SystemExit(f"the benchmark's DPO runs use the adapter-disabled reference, not {reference_kind}")
    return BenchPreferenceTrainer(**common, preference=arguments.preference, reference_kind=reference_kind)


def make_data(data_args: Any, tokenizer: Any, training_args: Any, pairs: bool) -> Any:
    from contextlib import redirect_stdout
    from io import StringIO

    from qwen_finetune.data import make_supervised_data
    from qwen_finetune.preference import make_preference_data

    with redirect_stdout(StringIO()):  # the data report is not part of the benchmark output
        return (make_preference_data if pairs else make_supervised_data)(
            data_args,
            tokenizer,
            training_args.model_max_length,
            per_device_batch_size=training_args.per_device_train_batch_size,
        )

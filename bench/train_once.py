"""Child process of the benchmark: train one configuration for a fixed number of steps and time it.

    python bench/train_once.py CONFIG_JSON MODEL_DIR GPTQ_DIR WORK_DIR [--profile PATH]

It goes through the toolkit's own path, in the order `qwen_finetune.train.train` uses: finetune.py's
flags (`parse_args`), `plan_training`, `load_tokenizer`, `make_supervised_data`, `load_model` and the
toolkit's `QwenTrainer`. Two things are added for measuring: a collator wrapper that records what each
micro-batch holds (real, supervised and padded tokens, sample lengths), and timestamps at the start of
every micro-batch and the end of every optimizer step. Nothing is saved. The baseline (batching "padded") computes its loss as the
original Qwen modeling did (`original_recipe_loss`): full float32 logits for every position, a contiguous
shifted copy of them, and cross entropy over all of it.

Prints one result line (see memory.emit_result); the parent reads this process's peak RSS itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn.functional as F
from configs import BenchConfig, finetune_flags
from flops import StepTokens
from memory import emit_result
from transformers import TrainerCallback

from qwen_finetune.args import parse_args
from qwen_finetune.modeling import count_parameters, load_model, load_tokenizer, plan_training
from qwen_finetune.train import QwenTrainer
from qwen_model.chunked_loss import IGNORE_INDEX

WARM_UP_MICRO_BATCHES = 1


def segment_lengths(feature: dict[str, Any]) -> list[int]:
    """Lengths of the samples in one row: the row itself, or each run of restarting position ids."""
    positions = feature.get("position_ids")
    if positions is None:
        return [len(feature["input_ids"])]
    starts = [index for index, position in enumerate(positions) if position == 0] + [len(positions)]
    return [end - start for start, end in zip(starts, starts[1:])]


class RecordingCollator:
    """The toolkit's collator, plus a record of each batch in the order batches are made."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator
        self.records: deque[StepTokens] = deque()

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.collator(features)
        segments = [length for feature in features for length in segment_lengths(feature)]
        rows, width = batch["input_ids"].shape
        self.records.append(
            StepTokens(
                real_tokens=sum(segments),
                supervised=int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
                padded_tokens=rows * width,
                sum_squared_segments=sum(length * length for length in segments),
                sum_squared_rows=rows * width * width,
            )
        )
        return batch


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


class BenchTrainer(QwenTrainer):
    """QwenTrainer that timestamps each training micro-batch and attaches its record to it.

    With `original_loss`, training batches are run with skip_logits=False and their loss is
    `original_recipe_loss` (the baseline).
    """

    def __init__(self, *args: Any, recorder: RecordingCollator, original_loss: bool, **kwargs: Any) -> None:
        super().__init__(*args, compute_loss_func=original_recipe_loss if original_loss else None, **kwargs)
        self.recorder = recorder
        self.original_loss = original_loss
        self.micro_batches: list[tuple[float, StepTokens]] = []  # (start time, what it holds)

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if model.training:
            self.micro_batches.append((time.perf_counter(), self.recorder.records.popleft()))
            if self.original_loss:
                inputs = {**inputs, "skip_logits": False}
        return super().compute_loss(model, inputs, *args, **kwargs)


class StepTimer(TrainerCallback):
    """Wall-clock time at the end of each optimizer step; optionally profiles the last step."""

    def __init__(self, profile_step: int | None, profile_path: Path | None) -> None:
        self.ends: list[float] = []
        self.profile_step = profile_step
        self.profile_path = profile_path
        self.profiler: torch.profiler.profile | None = None

    def on_step_begin(self, args: Any, state: Any, *rest: Any, **kwargs: Any) -> None:
        if self.profile_step is not None and state.global_step + 1 == self.profile_step:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        self.ends.append(time.perf_counter())
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            table = self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
            self.profile_path.write_text(table + "\n")
            self.profiler = None


def measure(trainer: BenchTrainer, timer: StepTimer) -> dict[str, Any]:
    """Totals from the start of the second micro-batch to the end of the last step.

    The first micro-batch pays one-off costs (allocator growth, thread pools, lazy initialisation) and is
    not measured; everything after it is, optimizer steps included.
    """
    if len(trainer.micro_batches) < 2:
        raise RuntimeError("at least two micro-batches are needed: one warm-up, one measured; add --steps")
    measured = StepTokens()
    for _, tokens in trainer.micro_batches[WARM_UP_MICRO_BATCHES:]:
        measured.add(tokens)
    started = trainer.micro_batches[WARM_UP_MICRO_BATCHES][0]
    return {
        "measured_micro_batches": len(trainer.micro_batches) - WARM_UP_MICRO_BATCHES,
        "seconds": timer.ends[-1] - started,
        "step_ends": [end - trainer.micro_batches[0][0] for end in timer.ends],
        "tokens": measured.__dict__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="BenchConfig as JSON")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("gptq_dir", type=Path)
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--data_cache_dir", type=Path, required=True)
    parser.add_argument("--profile", type=Path, help="write a torch.profiler table of the last step here")
    cli = parser.parse_args()
    config = BenchConfig(**json.loads(cli.config))
    logging.basicConfig(level=logging.WARNING)
    flags = finetune_flags(config, cli.model_dir, cli.gptq_dir, cli.work_dir)
    flags += ["--data_cache_dir", str(cli.data_cache_dir), "--preprocessing_num_workers", "2"]
    model_args, data_args, training_args, lora_args = parse_args(flags)

    started = time.perf_counter()
    plan = plan_training(model_args, lora_args, training_args)
    tokenizer = load_tokenizer(plan.checkpoint.path, training_args.model_max_length)
    data = make_data(data_args, tokenizer, training_args)
    model = load_model(plan, lora_args, training_args)
    rss_after_load = psutil.Process().memory_info().rss
    recorder = RecordingCollator(data.data_collator)
    trainer = BenchTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train_dataset,
        data_collator=recorder,
        processing_class=tokenizer,
        plan=plan,
        recorder=recorder,
        original_loss=config.is_baseline,
    )
    timer = StepTimer(config.steps if cli.profile else None, cli.profile)
    trainer.add_callback(timer)
    setup_seconds = time.perf_counter() - started
    metrics = trainer.train().metrics
    trainable, total = count_parameters(trainer.model)
    emit_result(
        {
            "config": config.to_dict(),
            "flags": flags,
            "plan": plan.describe(),
            "lora_rank": lora_args.lora_r,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "train_loss": metrics.get("train_loss"),
            "setup_seconds": setup_seconds,
            "rss_after_load_bytes": rss_after_load,
            "train_rows": len(data.train_dataset),
            "torch_threads": torch.get_num_threads(),
            "attention": getattr(model.config, "_attn_implementation", None),
            "loadavg_end": os.getloadavg(),
            "data": {
                key: data.report["train"][key]
                for key in ("samples_kept", "total_tokens", "supervised_tokens")
            },
            **measure(trainer, timer),
        }
    )


def make_data(data_args: Any, tokenizer: Any, training_args: Any) -> Any:
    from contextlib import redirect_stdout
    from io import StringIO

    from qwen_finetune.data import make_supervised_data

    with redirect_stdout(StringIO()):  # the data report is not part of the benchmark output
        return make_supervised_data(
            data_args,
            tokenizer,
            training_args.model_max_length,
            per_device_batch_size=training_args.per_device_train_batch_size,
        )


if __name__ == "__main__":
    main()

"""What the benchmark children share: what a batch holds, per-micro-batch timestamps, the measured window.

Every child (the toolkit's `train_once.py`, the peers' `trl_once.py`) wraps its trainer's collator in a
`RecordingCollator`, mixes `TimedMicroBatches` into its trainer and adds a `StepTimer`; `measure` then
gives the same figures for all of them: from the start of the second micro-batch to the end of the last
optimizer step, with the tokens those micro-batches held.
"""

from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path
from typing import Any

import torch
from flops import StepTokens
from transformers import TrainerCallback

from qwen_model.chunked_loss import IGNORE_INDEX

WARM_UP_MICRO_BATCHES = 1


def _restarts(positions: list[int]) -> list[int]:
    """Lengths of the runs of `positions` that each start at 0 (the samples of a packed row)."""
    starts = [index for index, position in enumerate(positions) if position == 0] + [len(positions)]
    return [end - start for start, end in zip(starts, starts[1:]) if end > start]


def batch_tokens(batch: dict[str, Any]) -> StepTokens:
    """Real, supervised and computed tokens of a collated batch, and the sample lengths it holds.

    Rows with position ids are packed: their samples are the runs of restarting positions within the
    row's real tokens (`row_lengths` of the toolkit's collator, else the attention mask, else the whole
    row, as for padding-free rows). Other rows hold one sample of attention_mask.sum() tokens. Targets
    come from the labels (-100: none), or from TRL's `completion_mask` in its preference batches.
    """
    input_ids = batch["input_ids"]
    rows, width = input_ids.shape
    if "row_lengths" in batch:
        real = [int(length) for length in batch["row_lengths"]]
    elif "attention_mask" in batch:
        real = [int(length) for length in batch["attention_mask"].sum(-1)]
    else:
        real = [width] * rows
    if "position_ids" in batch:
        positions = batch["position_ids"].expand(rows, width)
        segments = [
            length for row in range(rows) for length in _restarts(positions[row, : real[row]].tolist())
        ]
    else:
        segments = real
    if "labels" in batch:
        supervised = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    else:  # TRL's preference batches mark the answers instead: each answer token is one target
        supervised = int(batch["completion_mask"][:, 1:].sum())
    return StepTokens(
        real_tokens=sum(real),
        supervised=supervised,
        padded_tokens=rows * width,
        sum_squared_segments=sum(length * length for length in segments),
        sum_squared_rows=rows * width * width,
    )


class RecordingCollator:
    """A trainer's collator, plus a record of each batch in the order batches are made."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator
        self.records: deque[StepTokens] = deque()

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(features)
        self.records.append(batch_tokens(batch))
        return batch


class TimedMicroBatches:
    """Trainer mixin: timestamps each training micro-batch as its loss starts and attaches its record.

    Put it before the trainer class (`class T(TimedMicroBatches, SFTTrainer)`) and set `recorder`.
    """

    recorder: RecordingCollator
    micro_batches: list[tuple[float, StepTokens]]

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        if model.training:
            self.micro_batches.append((time.perf_counter(), self.recorder.records.popleft()))
        return super().compute_loss(model, inputs, *args, **kwargs)  # type: ignore[misc]


def start_timing(trainer: Any, recorder: RecordingCollator) -> None:
    """Hook a trainer (with TimedMicroBatches) up to its recording collator."""
    trainer.recorder = recorder
    trainer.micro_batches = []
    trainer.data_collator = recorder


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
        if self.profiler is not None and self.profile_path is not None:
            self.profiler.__exit__(None, None, None)
            table = self.profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
            self.profile_path.write_text(table + "\n")
            self.profiler = None


def measure(trainer: Any, timer: StepTimer) -> dict[str, Any]:
    """Totals from the start of the second micro-batch to the end of the last step.

    The first micro-batch pays one-off costs (allocator growth, thread pools, lazy initialisation) and is
    not measured; everything after it is, optimizer steps included.
    """
    micro_batches = trainer.micro_batches
    if len(micro_batches) < 2:
        raise RuntimeError("at least two micro-batches are needed: one warm-up, one measured; add --steps")
    measured = StepTokens()
    for _, tokens in micro_batches[WARM_UP_MICRO_BATCHES:]:
        measured.add(tokens)
    started = micro_batches[WARM_UP_MICRO_BATCHES][0]
    return {
        "measured_micro_batches": len(micro_batches) - WARM_UP_MICRO_BATCHES,
        "seconds": timer.ends[-1] - started,
        "step_ends": [end - micro_batches[0][0] for end in timer.ends],
        "tokens": measured.__dict__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_end": os.getloadavg(),
    }


def model_dimensions(config: Any) -> dict[str, int]:
    """The config fields bench/flops.py's ModelShape reads, from a model's config."""
    return {
        name: int(getattr(config, name))
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "kv_channels")
        + ("intermediate_size", "vocab_size")
    }

"""What a run measures and reports: real and supervised tokens, throughput, peak memory, the summary.

The trainer counts each batch with `TokenMeter`; totals are summed over processes at each log, so
the logged tokens/s and the summary describe the whole run, without padding.
"""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from qwen_finetune.data.collate import ROW_LENGTHS
from qwen_finetune.training_mode import TrainingMode
from qwen_model.chunked_loss import IGNORE_INDEX


class TokenMeter:
    """Counts real (non-padding) tokens and supervised tokens per process; totals are summed over
    processes at each log. Real tokens come from the packed rows' lengths (packed batches have no
    attention mask), else from the attention mask; a batch with neither has no padding."""

    def __init__(self) -> None:
        self.pending: torch.Tensor | None = None  # [tokens, supervised tokens] since the last sync, on device
        self.tokens = 0
        self.supervised = 0
        self.session_tokens = 0
        self.last_sync: float | None = None  # set at the first counted batch
        self.restored = False

    def count(self, inputs: dict[str, torch.Tensor]) -> None:
        if self.last_sync is None:
            self.last_sync = time.perf_counter()
        lengths, mask, input_ids = inputs.get(ROW_LENGTHS), inputs.get("attention_mask"), inputs["input_ids"]
        if lengths is not None:
            tokens = lengths.sum()
        elif mask is not None:
            tokens = mask.sum()
        else:
            tokens = torch.tensor(input_ids.numel(), device=input_ids.device)
        supervised = (inputs["labels"][..., 1:] != IGNORE_INDEX).sum()
        counts = torch.stack([tokens.long(), supervised.long()])  # stays on the device: no sync per step
        self.pending = counts if self.pending is None else self.pending + counts

    def restore(self, log_history: list[dict[str, Any]]) -> None:
        """After a resume, continue the totals from the last training log of the checkpoint."""
        self.restored = True
        for entry in reversed(log_history):
            if "supervised_tokens_seen" in entry:
                self.tokens = int(entry["tokens_seen"])
                self.supervised = int(entry["supervised_tokens_seen"])
                return

    def sync(self, trainer: Trainer) -> dict[str, float]:
        """Sum the pending counts over processes (collective: every process logs at the same steps).

        A resumed run first continues the totals of the checkpoint's log history."""
        if not self.restored:
            self.restore(trainer.state.log_history)
        local = self.pending if self.pending is not None else torch.zeros(2, dtype=torch.long)
        pending = trainer.accelerator.reduce(local.to(trainer.args.device), reduction="sum").cpu()
        self.pending = None
        now = time.perf_counter()
        interval = max(now - (self.last_sync or now), 1e-9)
        self.last_sync = now
        new_tokens, new_supervised = (int(value) for value in pending)
        self.tokens += new_tokens
        self.supervised += new_supervised
        self.session_tokens += new_tokens
        return {
            "tokens_seen": self.tokens,
            "supervised_tokens_seen": self.supervised,
            "tokens_per_second": round(new_tokens / interval, 1),
        }


def format_log_line(logs: dict[str, Any], state: Any) -> str | None:
    if "loss" in logs:
        parts = [f"step {state.global_step}/{state.max_steps}", f"epoch {logs.get('epoch', 0):.2f}"]
        parts.append(f"loss {logs['loss']:.4f}")
        if "learning_rate" in logs:
            parts.append(f"lr {logs['learning_rate']:.3g}")
        if "grad_norm" in logs:
            parts.append(f"grad_norm {logs['grad_norm']:.3g}")
        parts.append(f"{logs.get('tokens_per_second', 0):.0f} tokens/s")
        parts.append(f"supervised tokens {logs.get('supervised_tokens_seen', 0)}")
        return " | ".join(parts)
    if "eval_loss" in logs:
        return f"step {state.global_step}/{state.max_steps} | eval_loss {logs['eval_loss']:.4f}"
    return None


def peak_rss_bytes() -> int:
    """This process's own peak resident memory.

    Linux's ru_maxrss survives exec: a run started from a large process (a notebook, a test session, a
    benchmark driver) would report that process's size. The memory map's high-water mark (VmHWM) starts
    afresh with the program, so it is read where it exists.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max allocated"
    return peak_rss_bytes(), "peak RSS"


def peak_memory_over_processes(trainer: Trainer) -> int:
    """The largest peak (CUDA max allocated, or peak RSS on CPU) of all processes so far; collective."""
    memory, _ = peak_memory_bytes(trainer.args.device)
    gathered = trainer.accelerator.gather(torch.tensor([memory], device=trainer.args.device))
    return int(gathered.max().item())


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, ZeRO-3 partitions counted at full size (peft's count for adapters)."""
    peft_count = getattr(model, "get_nb_trainable_parameters", None)
    if callable(peft_count):
        return peft_count()
    trainable = total = 0
    for parameter in model.parameters():
        count = getattr(parameter, "ds_numel", None) or parameter.numel()
        total += count
        if parameter.requires_grad:
            trainable += count
    return trainable, total


def build_summary(
    trainer: Trainer, mode: TrainingMode, meter: TokenMeter, train_metrics: dict[str, Any]
) -> dict[str, Any]:
    """Run summary; collective (peak memory is the maximum over processes)."""
    args = trainer.args
    memory = peak_memory_over_processes(trainer)
    _, kind = peak_memory_bytes(args.device)
    assert trainer.model is not None, "the summary is built after training"
    trainable, total = count_parameters(trainer.model)
    runtime = float(train_metrics.get("train_runtime", 0.0))
    return {
        "mode": mode.describe(),
        "train_embeddings": mode.train_embeddings,
        "train_embeddings_reason": mode.embeddings_reason,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "global_steps": trainer.state.global_step,
        "train_loss": train_metrics.get("train_loss"),
        "tokens_seen": meter.tokens,
        "supervised_tokens_seen": meter.supervised,
        "tokens_per_second": round(meter.session_tokens / runtime, 1) if runtime > 0 else None,
        "train_runtime_seconds": round(runtime, 2),
        "peak_memory_bytes": memory,
        "peak_memory_kind": kind,
        "processes": trainer.accelerator.num_processes,
        "output_dir": str(Path(str(args.output_dir)).resolve()),
    }


def format_summary(summary: dict[str, Any]) -> str:
    share = 100.0 * summary["trainable_parameters"] / max(summary["total_parameters"], 1)
    loss = "n/a" if summary["train_loss"] is None else f"{summary['train_loss']:.4f}"
    lines = [
        "training summary",
        f"  mode                   {summary['mode']}",
        f"  trainable parameters   {summary['trainable_parameters']:,} of {summary['total_parameters']:,} ({share:.2f}%)",
        f"  steps                  {summary['global_steps']}",
        f"  train loss             {loss}",
        f"  tokens seen            {summary['tokens_seen']:,} ({summary['supervised_tokens_seen']:,} supervised)",
        f"  throughput             {summary['tokens_per_second']} tokens/s over {summary['processes']} process(es)",
        f"  peak memory            {summary['peak_memory_bytes'] / 2**30:.2f} GiB ({summary['peak_memory_kind']}, "
        "max over processes)",
        f"  output                 {summary['output_dir']}",
    ]
    return "\n".join(lines)

"""finetune.py: parse flags, check them against the checkpoint, train with the HF Trainer, save, summarise.

Order matters: everything that can be checked without loading weights is checked first (flags,
checkpoint, output dir, data), so a wrong run fails in seconds with a message that says how to fix it.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from qwen_finetune.args import LoraArguments, ModelArguments, TrainingArguments, parse_args
from qwen_finetune.checkpoint import save_checkpoint_dir
from qwen_finetune.data import DataArguments, DataError, make_supervised_data, run_check_data
from qwen_finetune.data.collate import ROW_LENGTHS
from qwen_finetune.errors import ArgumentError, ToolkitError
from qwen_finetune.modeling import TrainingPlan, count_parameters, load_model, load_tokenizer, plan_training
from qwen_model.chunked_loss import IGNORE_INDEX

logger = logging.getLogger("qwen_finetune")

SUMMARY_FILE = "train_summary.json"
BOOKKEEPING_KEYS = (ROW_LENGTHS,)  # batch entries for the trainer only, never model arguments


def model_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The batch without the collator's bookkeeping entries: what may be passed to model.forward."""
    return {key: value for key, value in inputs.items() if key not in BOOKKEEPING_KEYS}


# ----------------------------------------------------------------------------------- token accounting


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
        """Sum the pending counts over processes (collective: every process logs at the same steps)."""
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


class QwenTrainer(Trainer):
    """The HF Trainer plus token accounting and our self-contained checkpoint directories.

    Batches reach the model only through compute_loss (training) and prediction_step (evaluation,
    which calls compute_loss when the batch has labels); both drop the bookkeeping entries first."""

    def __init__(self, *args: Any, plan: TrainingPlan, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plan = plan
        self.meter = TokenMeter()

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        if model.training:
            self.meter.count(inputs)
        return super().compute_loss(
            model, model_inputs(inputs), return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
        )

    def prediction_step(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        prediction_loss_only: bool,
        ignore_keys: list[str] | None = None,
    ) -> tuple[torch.Tensor | None, Any, Any]:
        # Evaluation without metrics needs only the loss: the model then never materialises the
        # [tokens x vocabulary] logits (151936 columns) and computes the loss in chunks instead.
        inputs = model_inputs(inputs)
        if prediction_loss_only and "labels" in inputs:
            inputs["skip_logits"] = True
        return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            if not self.meter.restored:
                self.meter.restore(self.state.log_history)
            logs.update(self.meter.sync(self))
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        # Overrides the Trainer's writer (called by save_model for checkpoints and the final model,
        # after ZeRO-3 weights were gathered) so every saved directory has the same, complete layout.
        if not self.args.should_save:
            return
        save_checkpoint_dir(
            self.accelerator.unwrap_model(self.model),
            output_dir or self.args.output_dir,
            state_dict=state_dict,
            is_main_process=True,
            tokenizer=self.processing_class,
            source_checkpoint=self.plan.checkpoint.path,
            chatml_trained=self.plan.train_embeddings,
            max_shard_size=self.args.max_shard_size,
            training_args=self.args,
        )


class ProgressBar(ProgressCallback):
    """HF's progress bar without its dict dump of every log (TrainingLog prints a readable line)."""

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        return None


class TrainingLog(TrainerCallback):
    """One line per log on the main process: step, epoch, loss, learning rate, tokens/s."""

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        line = format_log_line(logs, state)
        if line is not None:
            tqdm.write(line)  # keeps a progress bar intact
            sys.stdout.flush()


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


# --------------------------------------------------------------------------------------------- checks


def resolve_resume(training_args: TrainingArguments) -> str | None:
    """--resume_from_checkpoint DIR, or True/latest for the newest checkpoint-N in --output_dir."""
    value = training_args.resume_from_checkpoint
    if not value:
        return None
    if str(value).lower() in ("true", "latest", "last"):
        last = (
            get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        )
        if last is None:
            raise ArgumentError(
                f"--resume_from_checkpoint {value}: no checkpoint-N directory in {training_args.output_dir}; "
                "give the checkpoint directory explicitly"
            )
        return last
    if not (Path(value) / "trainer_state.json").is_file():
        raise ArgumentError(
            f"--resume_from_checkpoint {value}: not a checkpoint (no trainer_state.json); give a checkpoint-N "
            f"directory written by an earlier run, or 'latest'"
        )
    return str(value)


def check_output_dir(training_args: TrainingArguments, resuming: bool) -> None:
    output = Path(training_args.output_dir)
    if resuming or training_args.overwrite_output_dir or not output.is_dir():
        return
    if any(output.iterdir()):
        raise ArgumentError(
            f"--output_dir {output} exists and is not empty; choose a new directory, pass --overwrite_output_dir "
            "to write into it anyway, or --resume_from_checkpoint latest to continue the run that is there"
        )


# -------------------------------------------------------------------------------------------- summary


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"


def build_summary(trainer: QwenTrainer, plan: TrainingPlan, train_metrics: dict[str, Any]) -> dict[str, Any]:
    """Run summary; collective (peak memory is the maximum over processes)."""
    args = trainer.args
    memory, kind = peak_memory_bytes(args.device)
    gathered = trainer.accelerator.gather(torch.tensor([memory], device=args.device))
    memory = int(gathered.max().item())
    trainable, total = count_parameters(trainer.model)
    runtime = float(train_metrics.get("train_runtime", 0.0))
    meter = trainer.meter
    return {
        "mode": plan.describe(),
        "train_embeddings": plan.train_embeddings,
        "train_embeddings_reason": plan.embeddings_reason,
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
        "output_dir": str(Path(args.output_dir).resolve()),
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


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class TrainingRun:
    trainer: QwenTrainer
    plan: TrainingPlan
    summary: dict[str, Any]


def train(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    lora_args: LoraArguments,
    callbacks: Sequence[TrainerCallback] = (),
) -> TrainingRun:
    """One training run; raises ArgumentError / DataError before loading weights when the setup is wrong."""
    plan = plan_training(model_args, lora_args, training_args)
    logger.info("training mode: %s", plan.describe())
    if plan.method != "full":
        logger.info(
            "trainable embeddings (wte, lm_head): %s (%s)", plan.train_embeddings, plan.embeddings_reason
        )
    resume = resolve_resume(training_args)
    check_output_dir(training_args, resuming=resume is not None)
    _ = training_args.device  # sets up the process group
    training_args.distributed_state.wait_for_everyone()  # every process checked before anyone writes
    if training_args.deepspeed:
        # ZeRO-3 partitions the weights while they load (deepspeed.zero.Init), which needs DeepSpeed's
        # communication layer up; on CPU (use_cpu) nothing else would have started it yet.
        import deepspeed

        deepspeed.init_distributed()

    tokenizer = load_tokenizer(plan.checkpoint.path, training_args.model_max_length)
    data = make_supervised_data(
        data_args,
        tokenizer,
        training_args.model_max_length,
        per_device_batch_size=training_args.per_device_train_batch_size,
        main_process_first=lambda: training_args.main_process_first(local=True, desc="data preparation"),
        output_dir=training_args.output_dir,
    )
    set_seed(training_args.seed)  # new adapter weights are random: same seed, same run
    model = load_model(plan, lora_args, training_args)
    trainer = QwenTrainer(
        model=model,
        args=training_args,
        train_dataset=data.train_dataset,
        eval_dataset=data.eval_dataset,
        data_collator=data.data_collator,
        processing_class=tokenizer,
        plan=plan,
    )
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if not training_args.disable_tqdm:
        trainer.add_callback(ProgressBar())
    trainer.add_callback(TrainingLog())
    for callback in callbacks:
        trainer.add_callback(callback)

    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    summary = build_summary(trainer, plan, result.metrics)
    if trainer.is_world_process_zero():
        print(format_summary(summary), flush=True)
        (Path(training_args.output_dir) / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    return TrainingRun(trainer, plan, summary)


def configure_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if rank == 0 else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s] [%(name)s] %(message)s", "%H:%M:%S"))
    package_logger = logging.getLogger("qwen_finetune")
    package_logger.handlers[:] = [handler]
    package_logger.setLevel(level)
    package_logger.propagate = False
    transformers.utils.logging.set_verbosity_warning()


def release_process_group() -> None:
    """End a multi-process run in order: wait for every rank, then tear the process group down.

    Left to interpreter shutdown, a rank that exits first closes its connections while the others may
    still be writing; once in three CI runs a ZeRO-3 run finished, saved and printed its summary, then
    rank 0 aborted at exit ("terminate called without an active exception", SIGABRT), so torchrun
    reported a failed run.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Entry point of finetune.py (and the `qwen-finetune` console script); returns the exit code."""
    configure_logging()
    try:
        model_args, data_args, training_args, lora_args = parse_args(argv)
    except (ToolkitError, ValueError) as error:  # a flag value __post_init__ rejected
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    try:
        if data_args.check_data:
            return check_data(model_args, data_args, training_args)
        train(model_args, data_args, training_args, lora_args)
        release_process_group()
    except ArgumentError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    except DataError as error:
        print(f"data error: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


def check_data(model_args: ModelArguments, data_args: DataArguments, training_args: TrainingArguments) -> int:
    """--check_data: only the tokenizer is loaded, never the model."""
    if not model_args.model_name_or_path:
        raise ArgumentError("--check_data needs --model_name_or_path (for its tokenizer)")
    tokenizer = load_tokenizer(model_args.model_name_or_path, training_args.model_max_length)
    return run_check_data(
        data_args,
        tokenizer,
        training_args.model_max_length,
        output_dir=None,
        per_device_batch_size=training_args.per_device_train_batch_size,
    )

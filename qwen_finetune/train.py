"""finetune.py: parse flags, check them against the checkpoint, train with the HF Trainer, save, summarise.

Order matters: everything that can be checked without loading weights is checked first (flags,
checkpoint, output dir, data), so a wrong run fails in seconds with a message that says how to fix it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import IntervalStrategy, get_last_checkpoint

from qwen_finetune.args import RunArguments, TrainingArguments, parse_run_arguments
from qwen_finetune.checkpoint_info import MEMORY_PLAN_FILE, TRAIN_SUMMARY_FILE
from qwen_finetune.console import quiet_prints
from qwen_finetune.data import DataError, PreparedData, make_supervised_data, run_check_data
from qwen_finetune.data.collate import ROW_LENGTHS
from qwen_finetune.errors import ArgumentError, ToolkitError
from qwen_finetune.fsdp import activate_fsdp_on_cpu, check_fsdp_request
from qwen_finetune.host_memory import keep_freed_memory
from qwen_finetune.json_files import write_json
from qwen_finetune.memory_plan import PreferenceSetup, RunPlan, plan_run
from qwen_finetune.model_dir import (
    INITIAL_ADAPTER_DIR,
    is_peft_model,
    save_initial_adapter,
    save_trained_model,
)
from qwen_finetune.model_loading import fill_special_token_ids, load_model, load_tokenizer
from qwen_finetune.preference import make_preference_data
from qwen_finetune.preference.reference import ReferenceKind, choose_reference, describe_reference
from qwen_finetune.preference.summary import format_preference_summary, preference_summary
from qwen_finetune.report.build import write_report
from qwen_finetune.report.callback import ReportCallback
from qwen_finetune.report.logged_values import extra_log_values
from qwen_finetune.run_metrics import TokenMeter, build_summary, format_log_line, format_summary
from qwen_finetune.sample_answers import SampleAnswersCallback, build_sample_prompts, find_tensorboard
from qwen_finetune.tokenizer_protocol import QwenTokenizerLike
from qwen_finetune.training_mode import TrainingMode, choose_training_mode, mutates_base_weights

logger = logging.getLogger("qwen_finetune")

BOOKKEEPING_KEYS = (ROW_LENGTHS,)  # batch entries for the trainer only, never model arguments


def model_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The batch without the collator's bookkeeping entries: what may be passed to model.forward."""
    return {key: value for key, value in inputs.items() if key not in BOOKKEEPING_KEYS}


class QwenTrainer(Trainer):
    """The HF Trainer plus token accounting and our self-contained checkpoint directories.

    Batches reach the model only through compute_loss (training) and prediction_step (evaluation,
    which calls compute_loss when the batch has labels); both drop the bookkeeping entries first."""

    args: TrainingArguments

    def __init__(
        self, *args: Any, mode: TrainingMode, initial_adapter: Path | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.mode = mode
        self.initial_adapter = initial_adapter  # PiSSA / OLoRA: converts the final adapter to plain LoRA
        self.meter = TokenMeter()

    def create_accelerator_and_postprocess(self) -> None:
        super().create_accelerator_and_postprocess()
        activate_fsdp_on_cpu(self)  # accelerate applies --fsdp on GPUs only; on CPU it would run DDP

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> Any:
        if model.training:
            self.meter.count(inputs)  # before model_inputs(): packed rows' real lengths are bookkeeping
        inputs = model_inputs(inputs)
        if model.training:
            # The loss straight from the hidden states, in chunks: the [tokens x vocabulary] logits
            # (151,936 columns) are never formed during training (unless a caller asks for them).
            inputs.setdefault("skip_logits", True)
        return super().compute_loss(
            model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
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
            logs.update(self.meter.sync(self))
        logs.update(extra_log_values(self, logs))
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        # Overrides the Trainer's writer (called by save_model for checkpoints and the final model,
        # after ZeRO-3 weights were gathered) so every saved directory has the same, complete layout.
        if not self.args.should_save:
            return
        directory = Path(output_dir or str(self.args.output_dir))
        final = directory.resolve() == Path(str(self.args.output_dir)).resolve()
        save_trained_model(
            self.accelerator.unwrap_model(self.model),
            directory,
            state_dict=state_dict,
            tokenizer=cast(QwenTokenizerLike, self.processing_class),
            source_checkpoint=self.mode.checkpoint.path,
            chatml_trained=self.mode.train_embeddings,
            max_shard_size=self.args.max_shard_size,
            training_args=self.args,
            initial_adapter=self.initial_adapter if final else None,
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


# --------------------------------------------------------------------------------------------- checks


def resolve_resume(training_args: TrainingArguments) -> str | None:
    """--resume_from_checkpoint DIR, or True/latest for the newest checkpoint-N in --output_dir."""
    value = training_args.resume_from_checkpoint
    if not value:
        return None
    if str(value).lower() in ("true", "latest", "last"):
        output_dir = str(training_args.output_dir)
        last = get_last_checkpoint(output_dir) if os.path.isdir(output_dir) else None
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
    output = Path(str(training_args.output_dir))
    if resuming or training_args.overwrite_output_dir or not output.is_dir():
        return
    if any(output.iterdir()):
        raise ArgumentError(
            f"--output_dir {output} exists and is not empty; choose a new directory, pass --overwrite_output_dir "
            "to write into it anyway, or --resume_from_checkpoint latest to continue the run that is there"
        )


# ---------------------------------------------------------------------------------------------- runs


@dataclass
class TrainingRun:
    trainer: QwenTrainer
    mode: TrainingMode
    summary: dict[str, Any]


def train(arguments: RunArguments, callbacks: Sequence[TrainerCallback] = ()) -> TrainingRun:
    """One training run; raises ArgumentError / DataError before loading weights when the setup is wrong."""
    training_args, lora_args = arguments.training, arguments.lora
    mode = choose_training_mode(arguments.model, lora_args, training_args)
    check_fsdp_request(training_args, mode, lora_args)
    logger.info("training mode: %s", mode.describe())
    if mode.method != "full":
        logger.info(
            "trainable embeddings (wte, lm_head): %s (%s)", mode.train_embeddings, mode.embeddings_reason
        )
    preference = arguments.preference
    reference_kind = choose_reference(preference, mode, lora_args) if preference.stage == "dpo" else None
    if reference_kind is not None:
        logger.info(
            "preference loss %s; reference: %s", preference.pref_loss, describe_reference(reference_kind)
        )
    plan = memory_plan(arguments, mode, reference_kind)
    if training_args.process_index == 0:
        print(plan.one_line(), flush=True)
        misfit = plan.warning()
        if misfit is not None:
            logger.warning(misfit)
    resume = resolve_resume(training_args)
    check_output_dir(training_args, resuming=resume is not None)
    _ = training_args.device  # sets up the process group
    training_args.distributed_state.wait_for_everyone()  # every process checked before anyone writes
    if training_args.deepspeed:
        # ZeRO-3 partitions the weights while they load (deepspeed.zero.Init), which needs DeepSpeed's
        # communication layer up; on CPU (use_cpu) nothing else would have started it yet.
        import deepspeed

        with quiet_prints():  # "... built successfully" on every CPU start
            deepspeed.init_distributed()

    tokenizer = load_tokenizer(mode.checkpoint.path, training_args.model_max_length)
    data: PreparedData[Any] = (make_supervised_data if reference_kind is None else make_preference_data)(
        arguments.data,
        tokenizer,
        training_args.model_max_length,
        per_device_batch_size=training_args.per_device_train_batch_size,
        main_process_first=lambda: training_args.main_process_first(local=True, desc="data preparation"),
        output_dir=training_args.output_dir,
    )
    if training_args.should_save:
        write_json(Path(str(training_args.output_dir)) / MEMORY_PLAN_FILE, plan.to_json())
    prompts = build_sample_prompts(
        arguments.samples,
        tokenizer,
        arguments.data.encoding_options(training_args.model_max_length),
        data.eval_samples,
        evaluates=training_args.eval_strategy != IntervalStrategy.NO,
    )
    report = ReportCallback()  # checks its dependencies before any weight is loaded
    set_seed(training_args.seed)  # new adapter weights are random: same seed, same run
    if training_args.keeps_freed_memory:
        keep_freed_memory()
    model = load_model(mode, lora_args, training_args)
    fill_special_token_ids(model, tokenizer)
    initial_adapter = None
    if (
        mode.method != "full"
        and mode.adapter_to_continue is None
        and mutates_base_weights(lora_args.init_lora_weights)
    ):
        initial_adapter = Path(str(training_args.output_dir)) / INITIAL_ADAPTER_DIR
        if training_args.should_save and is_peft_model(model):
            save_initial_adapter(model, Path(str(training_args.output_dir)))
    trainer_arguments: dict[str, Any] = {
        "model": model,
        "args": training_args,
        "train_dataset": data.train_dataset,
        "eval_dataset": data.eval_dataset,
        "data_collator": data.data_collator,
        "processing_class": tokenizer,
        "mode": mode,
        "initial_adapter": initial_adapter,
    }
    if reference_kind is None:
        trainer = QwenTrainer(**trainer_arguments)
    else:
        # imported here: the preference trainer is built on QwenTrainer, defined in this module
        from qwen_finetune.preference.trainer import make_preference_trainer

        trainer = make_preference_trainer(arguments, reference_kind, **trainer_arguments)
    trainer.remove_callback(ProgressCallback)
    trainer.remove_callback(PrinterCallback)
    if not training_args.disable_tqdm:
        trainer.add_callback(ProgressBar())
    trainer.add_callback(TrainingLog())
    if prompts:
        trainer.add_callback(
            SampleAnswersCallback(
                prompts,
                tokenizer,
                max_new_tokens=arguments.samples.sample_max_new_tokens,
                tensorboard=find_tensorboard(trainer),
            )
        )
    trainer.add_callback(report)
    for callback in callbacks:
        trainer.add_callback(callback)

    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()
    trainer.meter.sync(trainer)  # the tokens of the steps after the last log (collective)
    summary = build_summary(trainer, mode, trainer.meter, result.metrics)
    summary_text = format_summary(summary)
    if reference_kind is not None:
        summary["preference"] = preference_summary(trainer.state.log_history, preference, reference_kind)
        summary_text += "\n" + format_preference_summary(summary["preference"])
    if trainer.is_world_process_zero():
        print(summary_text, flush=True)
        (Path(str(training_args.output_dir)) / TRAIN_SUMMARY_FILE).write_text(
            json.dumps(summary, indent=2) + "\n"
        )
        logger.info("report: %s", write_report(str(training_args.output_dir)))
    return TrainingRun(trainer, mode, summary)


def configure_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if rank == 0 else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[%(asctime)s] [%(name)s] %(message)s", "%H:%M:%S"))
    package_logger = logging.getLogger("qwen_finetune")
    package_logger.handlers[:] = [handler]
    package_logger.setLevel(level)
    package_logger.propagate = False


def release_process_group(finished: bool) -> None:
    """End a multi-process run in order, also when it failed.

    After a finished run every rank waits for the others, then the process group is torn down: left to
    interpreter shutdown, a rank that exits first closes its connections while the others may still be
    writing (once in three CI runs a ZeRO-3 run saved and printed its summary, then rank 0 aborted at
    exit with SIGABRT, so torchrun reported a failed run). After a failure there is no wait, since the
    other ranks may never arrive.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if finished:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def launched_world_size() -> int:
    """Processes in this run as the launcher (torchrun, deepspeed) set it; 1 when started directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def exit_skipping_teardown(code: int) -> None:
    """End a process of a multi-process run once its work is done and its exit handlers have run.

    Even after the ordered release above, a rank still aborted now and then in the interpreter's final
    garbage collection ("terminate called without an active exception", SIGABRT, in 1 of about 6 CI
    runs), so torchrun reported a run as failed that had finished and saved. The exit handlers (logging,
    trackers, temporary files) run as usual; only the interpreter's own teardown is skipped.
    """
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Entry point of finetune.py (and the `qwen-finetune` console script); returns the exit code."""
    configure_logging()
    finished = False
    try:
        arguments = parse_run_arguments(argv)
        if arguments.data.check_data:
            return check_data(arguments)
        if arguments.training.plan:
            return print_plan(arguments)
        train(arguments)
        finished = True
    except DataError as error:
        print(f"data error: {error}", file=sys.stderr, flush=True)
        return 1
    except ToolkitError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    finally:
        release_process_group(finished)
    if launched_world_size() > 1:
        exit_skipping_teardown(0)
    return 0


def memory_plan(arguments: RunArguments, mode: TrainingMode, reference: ReferenceKind | None) -> RunPlan:
    """The run's memory and time plan, from the flags and config.json alone."""
    return plan_run(
        arguments.model,
        arguments.data,
        arguments.training,
        arguments.lora,
        world_size=launched_world_size(),
        mode=mode,
        preference=None if reference is None else PreferenceSetup(reference),
    )


def print_plan(arguments: RunArguments) -> int:
    """--plan: the memory and time per device, then exit; no weight is loaded, nothing is written."""
    mode = choose_training_mode(arguments.model, arguments.lora, arguments.training)
    preference = arguments.preference
    reference = choose_reference(preference, mode, arguments.lora) if preference.stage == "dpo" else None
    print(memory_plan(arguments, mode, reference).table(), flush=True)
    return 0


def check_data(arguments: RunArguments) -> int:
    """--check_data: only the tokenizer is loaded, never the model; pairs with --stage dpo."""
    if not arguments.model.model_name_or_path:
        raise ArgumentError("--check_data needs --model_name_or_path (for its tokenizer)")
    training_args = arguments.training
    tokenizer = load_tokenizer(arguments.model.model_name_or_path, training_args.model_max_length)
    return run_check_data(
        arguments.data,
        tokenizer,
        training_args.model_max_length,
        output_dir=None,
        per_device_batch_size=training_args.per_device_train_batch_size,
        kind="preference" if arguments.preference.stage == "dpo" else "supervised",
    )

"""Command-line flags of finetune.py: model, LoRA and training arguments as dataclasses, and their parser.

The data flags live in `qwen_finetune.data.args.DataArguments`. Every flag of the original Qwen
`finetune.py` and its launch scripts is accepted; the ones transformers 5 removed or renamed are mapped
here (`--evaluation_strategy`, `--warmup_ratio`, `--no_cuda`, `--overwrite_output_dir`,
`--gradient_checkpointing`). `--config FILE` reads flag values from a recipe (`recipe_file`). Every
problem with the flags is an `ArgumentError`.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn

import torch
import transformers
from transformers.hf_argparser import DataClassType
from transformers.trainer_utils import IntervalStrategy

from qwen_finetune.console import VERBOSE_HELP
from qwen_finetune.data.args import DataArguments
from qwen_finetune.errors import ArgumentError, ToolkitError
from qwen_finetune.fsdp import read_fsdp_config
from qwen_finetune.host_memory import KeepFreedMemory, keeps_freed_memory
from qwen_finetune.preference.args import PreferenceArguments
from qwen_finetune.recipe_file import CONFIG_FLAG, config_arguments, split_config_flags
from qwen_finetune.sample_answers.args import SampleArguments

logger = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = ("c_attn", "c_proj", "w1", "w2")

# --init_lora_weights values PEFT 0.21 can apply from the flag alone ("pissa_niter_N" too); its other
# initialisations (eva, corda, loftq, lora_ga) need a configuration object this toolkit does not build.
LORA_INITIALISATIONS = ("true", "false", "gaussian", "pissa", "olora", "orthogonal", "mica")
_PISSA_FAST = re.compile(r"pissa_niter_\d+")

# Old flag names read as the current ones, so that transformers never sees (nor warns about) a name
# the toolkit passes; the last of the two on a command line wins, as for any repeated flag.
RENAMED_FLAGS = {
    "gradient_checkpointing": "activation_checkpointing",
    "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs",
}


@dataclass
class ModelArguments:
    _argument_group_name = "model"

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Local checkpoint directory in the Qwen (v1) layout; nothing is downloaded "
            "(fetch hub models first: docs/training.md)."
        },
    )
    train_embeddings: Literal["auto", "yes", "no"] = field(
        default="auto",
        metadata={
            "help": "LoRA: also train wte and lm_head whole; auto decides from the checkpoint (logged)."
        },
    )


@dataclass
class LoraArguments:
    _argument_group_name = "LoRA / Q-LoRA"

    use_lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    q_lora: bool = field(
        default=False,
        metadata={"help": "LoRA on a quantized base (implies --use_lora): a GPTQ checkpoint, or nf4."},
    )
    q_lora_backend: Literal["auto", "gptq", "nf4"] = field(
        default="auto",
        metadata={
            "help": "Q-LoRA base: auto (gptq if the checkpoint is GPTQ), gptq, or nf4 (bitsandbytes, on load)."
        },
    )
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator (scale = alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        metadata={"help": "Module names that get LoRA adapters (space- or comma-separated)."},
    )
    lora_weight_path: str = field(
        default="",
        metadata={"help": "Continue training this adapter directory (its own adapter_config.json applies)."},
    )
    lora_bias: Literal["none", "all", "lora_only"] = field(
        default="none", metadata={"help": "Which biases the adapter trains."}
    )
    use_dora: bool = field(
        default=False,
        metadata={"help": "DoRA: also train the magnitude of each adapted weight (weight-decomposed LoRA)."},
    )
    use_rslora: bool = field(
        default=False,
        metadata={"help": "Rank-stabilised LoRA: scale the update by alpha / sqrt(r) instead of alpha / r."},
    )
    init_lora_weights: str = field(
        default="true",
        metadata={
            "help": "Adapter init: true (B = 0), false, gaussian, pissa, pissa_niter_N, olora, orthogonal, mica."
        },
    )

    def __post_init__(self) -> None:
        self.lora_target_modules = [
            name.strip() for item in self.lora_target_modules for name in item.split(",") if name.strip()
        ]
        if not self.lora_target_modules:
            raise ArgumentError(
                "--lora_target_modules is empty; give module names such as c_attn c_proj w1 w2"
            )
        if self.lora_r < 1:
            raise ArgumentError(f"--lora_r {self.lora_r} must be >= 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ArgumentError(f"--lora_dropout {self.lora_dropout} must be in [0, 1)")
        if self.q_lora_backend != "auto" and not self.q_lora:
            raise ArgumentError(
                f"--q_lora_backend {self.q_lora_backend} only applies with --q_lora; add --q_lora"
            )
        self.init_lora_weights = self.init_lora_weights.lower()
        if self.init_lora_weights not in LORA_INITIALISATIONS and not _PISSA_FAST.fullmatch(
            self.init_lora_weights
        ):
            raise ArgumentError(
                f"--init_lora_weights {self.init_lora_weights} is not one of "
                f"{', '.join(LORA_INITIALISATIONS)} or pissa_niter_N (N subspace iterations)"
            )
        if self.q_lora and not self.use_lora:
            logger.info("--q_lora implies --use_lora")
            self.use_lora = True

    @property
    def peft_init_lora_weights(self) -> bool | str:
        """--init_lora_weights as `peft.LoraConfig(init_lora_weights=...)` takes it."""
        return {"true": True, "false": False}.get(self.init_lora_weights, self.init_lora_weights)


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """HF training arguments plus the toolkit's own, the original Qwen fields and the flags transformers 5
    removed."""

    _argument_group_name = "training"

    config: list[str] = field(
        default_factory=list,
        metadata={
            "help": "YAML/JSON files of flag values (e.g. finetune/recipes/lora.yaml); later ones and flags win."
        },
    )
    plan: bool = field(
        default=False,
        metadata={"help": "Print the memory and time plan of this configuration and exit; loads no weights."},
    )
    verbose: bool = field(default=False, metadata={"help": VERBOSE_HELP})
    cache_dir: str | None = field(
        default=None, metadata={"help": "Accepted for compatibility; unused (local only)."}
    )
    optim: str = field(
        default="adamw_torch_fused",
        metadata={"help": "Optimizer (without DeepSpeed); the fused AdamW updates each tensor in one pass."},
    )
    model_max_length: int = field(
        default=8192,
        metadata={"help": "Tokens per sample (per packed row with --packing); longer samples are truncated."},
    )
    max_shard_size: str = field(
        default="2GB", metadata={"help": "Largest safetensors shard written for full-model checkpoints."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow writing into a non-empty --output_dir (nothing in it is deleted)."},
    )
    evaluation_strategy: Literal["no", "steps", "epoch"] | None = field(
        default=None, metadata={"help": "Old name of --eval_strategy; an explicit --eval_strategy wins."}
    )
    warmup_ratio: float | None = field(
        default=None,
        metadata={"help": "Old flag: warmup fraction [0, 1) of the steps; an explicit --warmup_steps wins."},
    )
    keep_freed_memory: KeepFreedMemory = field(
        default="auto",
        metadata={
            "help": "CPU runs (auto): glibc reuses freed tensors' memory, no page faults (docs/training.md)."
        },
    )
    no_cuda: bool = field(default=False, metadata={"help": "Old name of --use_cpu."})
    logging_dir: str | None = field(
        default=None,
        metadata={
            "help": "TensorBoard directory (sets $TENSORBOARD_LOGGING_DIR); default OUTPUT_DIR/runs/DATE_HOST."
        },
    )

    def __post_init__(self) -> None:
        self._map_removed_flags()
        self._choose_cpu_when_no_accelerator()
        if self.deepspeed:
            self.deepspeed = load_deepspeed_config(self.deepspeed, on_cpu=self.use_cpu)
        if self.fsdp_config is not None:
            self.fsdp_config = read_fsdp_config(self.fsdp_config)
        super().__post_init__()
        self.checkpoint_every_n_layers  # noqa: B018  # refuses a bad every_n_layers now
        self.keeps_freed_memory  # noqa: B018  # refuses "yes" where glibc is missing, before loading

    def _map_removed_flags(self) -> None:
        """Old flags fill in the new ones; an explicitly set new flag wins (the recipes set
        --warmup_ratio as a default that users override with --warmup_steps)."""
        if self.evaluation_strategy is not None:
            if self.eval_strategy in ("no", IntervalStrategy.NO):
                self.eval_strategy = self.evaluation_strategy
            elif self.evaluation_strategy != self.eval_strategy:
                logger.info(
                    "--eval_strategy %s overrides --evaluation_strategy %s",
                    self.eval_strategy,
                    self.evaluation_strategy,
                )
        if self.warmup_ratio is not None:
            if not 0.0 <= self.warmup_ratio < 1.0:
                raise ArgumentError(f"--warmup_ratio {self.warmup_ratio} must be in [0, 1)")
            if self.warmup_steps:
                logger.info(
                    "--warmup_steps %s overrides --warmup_ratio %s", self.warmup_steps, self.warmup_ratio
                )
            else:
                self.warmup_steps = self.warmup_ratio
        if self.no_cuda:
            self.use_cpu = True
        if self.logging_dir:
            os.environ["TENSORBOARD_LOGGING_DIR"] = self.logging_dir

    def _choose_cpu_when_no_accelerator(self) -> None:
        """Without an accelerator every process must run with use_cpu=True.

        Otherwise DeepSpeed fails on the batch size check and, worse, plain DDP silently runs
        independent single-process trainings (see docs/training.md, troubleshooting).
        """
        if not self.use_cpu and not torch.accelerator.is_available():
            logger.info("no GPU/accelerator found: training on CPU (use_cpu=True)")
            self.use_cpu = True

    @property
    def checkpoint_every_n_layers(self) -> int:
        """With activation checkpointing, transformers checkpoints blocks 0, n, 2n, ... and lets the
        others keep their activations. It reads n only when training starts, and divides by it, so
        __post_init__ reads it once to refuse a bad value before anything loads."""
        kwargs = self.activation_checkpointing_kwargs
        value = kwargs.get("every_n_layers", 1) if isinstance(kwargs, dict) else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ArgumentError(
                f"--gradient_checkpointing_kwargs every_n_layers {value!r} must be a whole number >= 1 "
                "(1 checkpoints every block, 2 every second one)"
            )
        return value

    @property
    def keeps_freed_memory(self) -> bool:
        return keeps_freed_memory(self.keep_freed_memory, trains_on_cpu=self.use_cpu)

    @property
    def deepspeed_config(self) -> dict[str, Any] | None:
        return self.deepspeed if isinstance(self.deepspeed, dict) else None

    @property
    def zero_stage(self) -> int | None:
        config = self.deepspeed_config
        if config is None:
            return None
        return int(config.get("zero_optimization", {}).get("stage", 0))


def load_deepspeed_config(value: str | dict[str, Any], on_cpu: bool) -> dict[str, Any]:
    """Read a DeepSpeed JSON config (path, JSON text or dict) and adapt it to a CPU-only run.

    The shipped configs are device-agnostic. On CPU, DeepSpeed would JIT-compile its C++ Adam
    (about 70 s per op); torch's AdamW (`"torch_adam": true`) is used instead unless the config
    sets `torch_adam` itself, and ZeRO-Offload is then allowed to run with that optimizer.
    """
    if isinstance(value, dict):
        config = json.loads(json.dumps(value))
    else:
        path = Path(value)
        if not path.is_file():
            raise ArgumentError(
                f"--deepspeed {value}: no such file; use finetune/ds_config_zero2.json, "
                "finetune/ds_config_zero3.json or their _offload variants"
            )
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ArgumentError(
                f"--deepspeed {value}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
            ) from error
    if on_cpu:
        _use_torch_adam(config)
    return config


def _use_torch_adam(config: dict[str, Any]) -> None:
    optimizer = config.get("optimizer")
    if not optimizer or str(optimizer.get("type", "")).lower() not in ("adam", "adamw"):
        return
    params = optimizer.setdefault("params", {})
    if "torch_adam" in params:
        return
    params["torch_adam"] = True
    zero = config.get("zero_optimization", {})
    offloaded = str(zero.get("offload_optimizer", {}).get("device", "none")).lower() not in ("none", "")
    if offloaded:
        config.setdefault("zero_force_ds_cpu_optimizer", False)
    logger.info("CPU run: DeepSpeed uses torch's AdamW (torch_adam) instead of JIT-compiling its C++ Adam")


class FlagParser(transformers.HfArgumentParser):
    """HfArgumentParser for every command of the toolkit: a wrong flag or value is an ArgumentError
    (the entry point prints one line), an unknown flag names the closest known one."""

    def error(self, message: str) -> NoReturn:
        raise ArgumentError(f"{message}; '{self.prog} --help' lists every flag")

    def parse_flags(self, arguments: list[str]) -> tuple[Any, ...]:
        """The dataclasses of `arguments`; unknown flags and refused values are ArgumentErrors."""
        _, unknown = self.parse_known_args(arguments)
        if unknown:
            raise self._unknown_flag(unknown[0])
        try:
            return self.parse_args_into_dataclasses(args=arguments, look_for_args_file=False)
        except ToolkitError:
            raise
        except ValueError as error:  # a dataclass refused a value or a combination of values
            raise ArgumentError(str(error)) from error

    def _unknown_flag(self, argument: str) -> ArgumentError:
        if not argument.startswith("-"):
            return ArgumentError(f"unexpected argument {argument!r}: every value follows its --flag")
        flags = [option for action in self._actions for option in action.option_strings]
        close = difflib.get_close_matches(argument.split("=", 1)[0], flags, n=1)
        hint = f"did you mean {close[0]}?" if close else f"'{self.prog} --help' lists every flag"
        return ArgumentError(f"unknown flag {argument}; {hint}")


class FinetuneParser(FlagParser):
    """finetune.py's parser; its help is the toolkit's grouped, one-line-per-flag text."""

    def format_help(self) -> str:
        from qwen_finetune.cli_help import render_help

        return render_help(self)


@dataclass(frozen=True)
class RunArguments:
    """Everything finetune.py was asked to do, one dataclass per group of flags."""

    model: ModelArguments
    data: DataArguments
    training: TrainingArguments
    lora: LoraArguments
    samples: SampleArguments
    preference: PreferenceArguments


def build_parser() -> FinetuneParser:
    dataclass_types = (
        ModelArguments,
        DataArguments,
        TrainingArguments,
        LoraArguments,
        PreferenceArguments,
        SampleArguments,
    )
    return FinetuneParser(
        [DataClassType(item) for item in dataclass_types],
        prog="finetune.py",
        allow_abbrev=False,  # a flag is its full name: qwen_finetune.unused_backends reads them before parsing
        description="Fine-tune a Qwen (v1) model on conversations or preference pairs (--stage dpo): full, LoRA, LoRA + embeddings, Q-LoRA (GPTQ or NF4). "
        "Reference: docs/training.md.",
    )


def parse_run_arguments(argv: list[str] | None = None) -> RunArguments:
    """Parse finetune.py flags: --config files first, then the command line, which overrides them."""
    parser = build_parser()
    files, command_line = split_config_flags(sys.argv[1:] if argv is None else argv)
    arguments = [_current_name(item) for item in config_arguments(files, parser) + command_line]
    if files:
        arguments += [CONFIG_FLAG, *files]
    model, data, training, lora, preference, samples = parser.parse_flags(arguments)
    return RunArguments(model, data, training, lora, samples, preference)


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, TrainingArguments, LoraArguments]:
    """The model, data, training and LoRA flags alone: what the mode decision and the memory plan read."""
    run = parse_run_arguments(argv)
    return run.model, run.data, run.training, run.lora


def _current_name(argument: str) -> str:
    """`--gradient_checkpointing[=V]` -> `--activation_checkpointing[=V]` (see RENAMED_FLAGS)."""
    if not argument.startswith("--"):
        return argument
    name, separator, value = argument[2:].partition("=")
    current = RENAMED_FLAGS.get(name.replace("-", "_"))
    return f"--{current}{separator}{value}" if current else argument

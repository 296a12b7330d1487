"""Command-line flags of finetune.py: model, LoRA and training arguments as dataclasses.

The data flags live in `qwen_finetune.data.args.DataArguments`. Every flag of the original Qwen
`finetune.py` and its launch scripts is accepted; the ones transformers 5 removed are mapped here
(`--evaluation_strategy`, `--warmup_ratio`, `--no_cuda`, `--overwrite_output_dir`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import transformers
from transformers.trainer_utils import IntervalStrategy

from qwen_finetune.data.args import DataArguments
from qwen_finetune.errors import ArgumentError

logger = logging.getLogger(__name__)

DEFAULT_LORA_TARGETS = ("c_attn", "c_proj", "w1", "w2")


@dataclass
class ModelArguments:
    _argument_group_name = "model"

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Local checkpoint directory in the Qwen (v1) layout (config.json, qwen.tiktoken, weights). "
            "Nothing is downloaded: fetch hub models first, e.g. `huggingface-cli download Qwen/Qwen-7B-Chat "
            "--local-dir DIR`."
        },
    )
    train_embeddings: Literal["auto", "yes", "no"] = field(
        default="auto",
        metadata={
            "help": "LoRA only: also train the embedding and output layers (wte, lm_head; saved whole in the "
            "adapter). auto decides from the checkpoint whether it already knows the ChatML tokens: "
            "generation_config.json chat_format 'chatml' means yes it does (no extra training), 'raw' means no; "
            "without that field, the <|im_start|>/<|im_end|> embedding rows are compared with never-used rows. "
            "The decision and its reason are logged."
        },
    )


@dataclass
class LoraArguments:
    _argument_group_name = "LoRA / Q-LoRA"

    use_lora: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    q_lora: bool = field(
        default=False,
        metadata={
            "help": "Q-LoRA: LoRA on a quantized base model (implies --use_lora). GPTQ Int4/Int8 checkpoints are "
            "detected from config.json; full-precision checkpoints need --q_lora_backend nf4."
        },
    )
    q_lora_backend: Literal["auto", "gptq", "nf4"] = field(
        default="auto",
        metadata={
            "help": "How the Q-LoRA base is quantized. auto: gptq when the checkpoint is GPTQ-quantized, "
            "otherwise an error; gptq: a GPTQ checkpoint (gptqmodel kernels); nf4: quantize a full-precision "
            "checkpoint to 4-bit NF4 while loading (bitsandbytes)."
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
        metadata={
            "help": "Continue training this existing adapter directory instead of a new one; its own "
            "adapter_config.json (rank, targets, modules_to_save) is used."
        },
    )
    lora_bias: Literal["none", "all", "lora_only"] = field(
        default="none", metadata={"help": "Which biases the adapter trains."}
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
        if self.q_lora and not self.use_lora:
            logger.info("--q_lora implies --use_lora")
            self.use_lora = True


@dataclass
class TrainingArguments(transformers.TrainingArguments):
    """HF training arguments plus the original Qwen fields and the flags transformers 5 removed."""

    _argument_group_name = "training"

    cache_dir: str | None = field(
        default=None, metadata={"help": "Accepted for compatibility; unused (local only)."}
    )
    optim: str = field(default="adamw_torch", metadata={"help": "Optimizer (without DeepSpeed)."})
    model_max_length: int = field(
        default=8192,
        metadata={
            "help": "Maximum tokens per sample (per packed row with --packing); longer samples are truncated."
        },
    )
    max_shard_size: str = field(
        default="2GB", metadata={"help": "Largest safetensors shard written for full-model checkpoints."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Allow writing into a non-empty --output_dir (nothing in it is deleted)."},
    )
    evaluation_strategy: str | None = field(
        default=None, metadata={"help": "Old name of --eval_strategy (no, steps, epoch)."}
    )
    warmup_ratio: float | None = field(
        default=None,
        metadata={
            "help": "Old flag: warmup as a fraction [0, 1) of the training steps (becomes --warmup_steps)."
        },
    )
    no_cuda: bool = field(default=False, metadata={"help": "Old name of --use_cpu."})
    logging_dir: str | None = field(
        default=None,
        metadata={
            "help": "TensorBoard directory (transformers 5 reads it from $TENSORBOARD_LOGGING_DIR, which this sets). "
            "Default: OUTPUT_DIR/runs/DATE_HOST."
        },
    )

    def __post_init__(self) -> None:
        self._map_removed_flags()
        self._choose_cpu_when_no_accelerator()
        if self.deepspeed:
            self.deepspeed = load_deepspeed_config(self.deepspeed, on_cpu=self.use_cpu)
        super().__post_init__()

    def _map_removed_flags(self) -> None:
        """Old flags fill in the new ones; an explicitly set new flag wins (the launch scripts pass
        --evaluation_strategy and --warmup_ratio as defaults that users override with the new names)."""
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


def build_parser() -> transformers.HfArgumentParser:
    return transformers.HfArgumentParser(
        (ModelArguments, DataArguments, TrainingArguments, LoraArguments),
        description="Fine-tune a Qwen (v1) model: full, LoRA, LoRA + embeddings, Q-LoRA (GPTQ or NF4). "
        "Reference: docs/training.md.",
    )


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, TrainingArguments, LoraArguments]:
    """Parse finetune.py flags; unknown flags are an error."""
    model_args, data_args, training_args, lora_args = build_parser().parse_args_into_dataclasses(args=argv)
    return model_args, data_args, training_args, lora_args

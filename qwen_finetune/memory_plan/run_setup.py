"""Everything the memory and time plan depends on, as one plain description of a training run.

`TrainingSetup` is built from finetune.py's flags and the checkpoint (`setup_from_args`, which
asks the toolkit's own mode decision, `choose_training_mode`, what it would load), or directly
(bench/ describes the original recipe's runs this way). Nothing here loads a weight.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch

from qwen_finetune.args import LoraArguments, ModelArguments, TrainingArguments
from qwen_finetune.checkpoint_info import ADAPTER_CONFIG_FILE
from qwen_finetune.data.args import DataArguments
from qwen_finetune.errors import ArgumentError
from qwen_finetune.json_files import read_json
from qwen_finetune.precision import checkpoint_dtype
from qwen_finetune.training_mode import EMBEDDING_MODULES, Method, TrainingMode, choose_training_mode

from .shapes import AdapterShape, ModelShape

Precision = Literal["fp32", "bf16", "fp16"]
DeviceKind = Literal["cpu", "cuda"]
LossKind = Literal["chunked", "full_logits"]
PRECISION_BYTES: dict[str, int] = {"fp32": 4, "bf16": 2, "fp16": 2}
PRECISION_OF_DTYPE: dict[torch.dtype, Precision] = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
}

# DeepSpeed's own defaults for the keys a config may leave out (deepspeed/runtime/zero/config.py).
DEEPSPEED_REDUCE_BUCKET = 500_000_000
DEEPSPEED_PREFETCH_BUCKET = 50_000_000
DEEPSPEED_MAX_LIVE_PARAMETERS = 1_000_000_000
DEEPSPEED_PERSISTENCE_THRESHOLD = 100_000


@dataclass(frozen=True)
class ZeroSetup:
    """The parts of a DeepSpeed ZeRO config that decide memory, with "auto" resolved as transformers
    resolves it from the model's hidden size."""

    stage: int
    offload_optimizer: bool = False
    offload_params: bool = False
    reduce_bucket_elements: int = DEEPSPEED_REDUCE_BUCKET
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    prefetch_bucket_elements: int = DEEPSPEED_PREFETCH_BUCKET
    max_live_parameters: int = DEEPSPEED_MAX_LIVE_PARAMETERS
    persistence_threshold: int = DEEPSPEED_PERSISTENCE_THRESHOLD

    @classmethod
    def from_config(cls, config: Mapping[str, Any], hidden: int) -> ZeroSetup:
        zero = config.get("zero_optimization", {})

        def elements(key: str, auto: int, default: int) -> int:
            value = zero.get(key, default)
            return auto if value == "auto" else int(float(value))

        def offloaded(key: str) -> bool:
            return str(zero.get(key, {}).get("device", "none")).lower() not in ("none", "")

        return cls(
            stage=int(zero.get("stage", 0)),
            offload_optimizer=offloaded("offload_optimizer"),
            offload_params=offloaded("offload_param"),
            reduce_bucket_elements=elements("reduce_bucket_size", hidden * hidden, DEEPSPEED_REDUCE_BUCKET),
            overlap_comm=bool(zero.get("overlap_comm", False)),
            contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
            prefetch_bucket_elements=elements(
                "stage3_prefetch_bucket_size", int(0.9 * hidden * hidden), DEEPSPEED_PREFETCH_BUCKET
            ),
            max_live_parameters=elements("stage3_max_live_parameters", 0, DEEPSPEED_MAX_LIVE_PARAMETERS),
            persistence_threshold=elements(
                "stage3_param_persistence_threshold", 10 * hidden, DEEPSPEED_PERSISTENCE_THRESHOLD
            ),
        )


@dataclass(frozen=True)
class PreferenceSetup:
    """A preference stage (DPO and its relatives): every micro-batch row is a pair whose chosen and
    rejected sequences go through one forward pass, plus the reference model's log-probabilities.

    reference: "none" (simpo / orpo: the policy alone), "adapter_disabled" (LoRA: the base model without
    the adapter, no extra weights), "frozen_copy" (a frozen copy of the starting weights, for full
    fine-tuning) or "precomputed" (log-probabilities computed before training: nothing extra while
    training).
    """

    reference: Literal["none", "adapter_disabled", "frozen_copy", "precomputed"]


@dataclass(frozen=True)
class TrainingSetup:
    shape: ModelShape
    method: Method
    quantization: Literal["gptq", "nf4"] | None = None
    quant_bits: int = 4
    quant_group_size: int = 128
    train_embeddings: bool = False  # LoRA: PEFT's trainable copies of wte and lm_head
    weight_precision: Precision = "fp32"  # the dtype the weights are loaded in
    compute_precision: Precision = "fp32"  # mixed precision of the run (autocast, or DeepSpeed's cast)
    stored_precision: Precision = "bf16"  # the dtype of the checkpoint's files
    adapter: AdapterShape | None = None
    lora_dropout: float = 0.05
    micro_batch: int = 1
    accumulation: int = 1
    max_length: int = 512
    packing: bool = False
    pad_to_max_length: bool = False
    gradient_checkpointing: bool = False
    checkpoint_every: int = 1  # transformers' every_n_layers: blocks 0, n, 2n, ... are checkpointed
    zero: ZeroSetup | None = None
    world_size: int = 1
    processes_per_node: int = 1
    device_kind: DeviceKind = "cpu"
    keeps_freed_memory: bool = False  # --keep_freed_memory: glibc serves every tensor from its heap
    loss: LossKind = "chunked"
    optimizer: str = "adamw_torch_fused"
    preference: PreferenceSetup | None = None

    def __post_init__(self) -> None:
        if (self.method == "full") != (self.adapter is None):
            raise ValueError("an adapter shape is given exactly when the method is lora or qlora")
        if (self.method == "qlora") != (self.quantization is not None):
            raise ValueError("a quantization is given exactly when the method is qlora")
        if self.checkpoint_every < 1:
            raise ArgumentError(f"every_n_layers {self.checkpoint_every} must be >= 1")
        if self.world_size < 1 or self.processes_per_node < 1:
            raise ArgumentError(f"world size {self.world_size}: at least one process is needed")
        if self.zero is not None and self.zero.stage == 3 and self.quantization is not None:
            raise ArgumentError("Q-LoRA cannot run under ZeRO-3: quantized weights cannot be partitioned")

    @property
    def embeddings_trained(self) -> bool:
        """wte and lm_head train: always in full fine-tuning, with LoRA when asked."""
        return self.method == "full" or self.train_embeddings

    @property
    def checkpointed_layers(self) -> int:
        """How many blocks gradient checkpointing, when on, recomputes in backward: 0, n, 2n, ..."""
        return -(-self.shape.layers // self.checkpoint_every)

    @property
    def compute_bytes(self) -> int:
        return PRECISION_BYTES[self.compute_precision]

    @property
    def mixed_precision(self) -> bool:
        return self.compute_precision != "fp32"

    @property
    def zero_stage(self) -> int:
        return self.zero.stage if self.zero is not None else 0

    @property
    def rows_per_micro_batch(self) -> int:
        """Sequences in one forward pass: a preference pair is two (chosen and rejected)."""
        return self.micro_batch * (2 if self.preference is not None else 1)

    @property
    def positions_per_micro_batch(self) -> int:
        """Token positions of one forward pass, at their longest: every row model_max_length wide
        (packed rows are full; padded batches are at most that wide)."""
        return self.rows_per_micro_batch * self.max_length

    @property
    def masked_attention(self) -> bool:
        """Rows that need a padding mask: unpacked batches of more than one row (packed rows attend per
        sample without a mask; a single row needs no padding)."""
        return not self.packing and self.rows_per_micro_batch > 1

    def with_changes(self, **changes: Any) -> TrainingSetup:
        return replace(self, **changes)


def setup_from_args(
    model_args: ModelArguments,
    data_args: DataArguments,
    training_args: TrainingArguments,
    lora_args: LoraArguments,
    *,
    world_size: int,
    device_kind: DeviceKind,
    preference: PreferenceSetup | None = None,
) -> TrainingSetup:
    """The run finetune.py would start with these flags (the mode decided by `choose_training_mode`)."""
    mode = choose_training_mode(model_args, lora_args, training_args)
    return setup_from_mode(
        mode,
        data_args,
        training_args,
        lora_args,
        world_size=world_size,
        device_kind=device_kind,
        preference=preference,
    )


def setup_from_mode(
    mode: TrainingMode,
    data_args: DataArguments,
    training_args: TrainingArguments,
    lora_args: LoraArguments,
    *,
    world_size: int,
    device_kind: DeviceKind,
    preference: PreferenceSetup | None = None,
) -> TrainingSetup:
    """As setup_from_args, for a training mode already decided."""
    config = mode.checkpoint.config
    shape = ModelShape.from_config(config)
    adapter = None
    if mode.method != "full":
        adapter = _adapter_shape(lora_args, mode.adapter_to_continue)
    quantization = mode.checkpoint.quantization_config or {}
    deepspeed = training_args.deepspeed_config
    return TrainingSetup(
        shape=shape,
        method=mode.method,
        quantization=mode.quantization,
        quant_bits=int(quantization.get("bits", 4)),
        quant_group_size=int(quantization.get("group_size", 128)),
        train_embeddings=mode.train_embeddings,
        weight_precision=PRECISION_OF_DTYPE[mode.dtype],
        compute_precision="bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32",
        stored_precision=PRECISION_OF_DTYPE.get(checkpoint_dtype(SimpleNamespace(**config)), "fp32"),
        adapter=adapter,
        lora_dropout=lora_args.lora_dropout,
        micro_batch=training_args.per_device_train_batch_size,
        accumulation=training_args.gradient_accumulation_steps,
        max_length=training_args.model_max_length,
        packing=data_args.packing,
        pad_to_max_length=data_args.pad_to_max_length,
        gradient_checkpointing=bool(training_args.gradient_checkpointing),
        checkpoint_every=training_args.checkpoint_every_n_layers,
        zero=ZeroSetup.from_config(deepspeed, shape.hidden) if deepspeed is not None else None,
        world_size=world_size,
        processes_per_node=_processes_per_node(world_size),
        device_kind=device_kind,
        keeps_freed_memory=training_args.keeps_freed_memory,
        optimizer=str(getattr(training_args.optim, "value", training_args.optim)),
        preference=preference,
    )


def _adapter_shape(lora_args: LoraArguments, continued: Path | None) -> AdapterShape:
    """The new adapter's shape from the flags, or the continued adapter's from its own config."""
    if continued is None:
        return AdapterShape(
            rank=lora_args.lora_r,
            targets=tuple(lora_args.lora_target_modules),
            bias=lora_args.lora_bias,
            dora=lora_args.use_dora,
        )
    saved = read_json(continued / ADAPTER_CONFIG_FILE)
    targets = saved.get("target_modules") or []
    if isinstance(targets, str):
        raise ArgumentError(
            f"{continued / ADAPTER_CONFIG_FILE}: target_modules is a pattern ({targets!r}); the plan needs "
            "the list of module names"
        )
    return AdapterShape(
        rank=int(saved.get("r", lora_args.lora_r)),
        targets=tuple(name for name in targets if name not in EMBEDDING_MODULES),
        bias=str(saved.get("bias", "none")),
        dora=bool(saved.get("use_dora", False)),
    )


def _processes_per_node(world_size: int) -> int:
    """Processes sharing this machine's memory: torchrun's LOCAL_WORLD_SIZE, else all of them."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    return min(int(local), world_size) if local else world_size

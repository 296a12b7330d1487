"""FSDP (`--fsdp`, `--fsdp_config`): the weights, gradients and optimizer state sharded across the
processes, or an error that says why not — never plain data parallelism in its place.

transformers turns the two flags into the arguments of accelerate's FSDP plugin, and accelerate
applies the plugin only on GPU-like devices: with `use_cpu` (every run on a machine without an
accelerator) it sets the run up as MULTI_CPU and drops the plugin, so the Trainer would wrap the
model in DDP. torch's FSDP2 (`torch.distributed.fsdp.fully_shard`) itself runs on CPU with gloo, so
on CPU `activate_fsdp_on_cpu` gives accelerate the plugin after the fact, as it does itself on GPU, and
the Trainer then prepares, saves and resumes the model exactly as on GPU.

Saving: the Trainer gathers the full state dict (`FULL_STATE_DICT`, required here) and
QwenTrainer._save writes it as a complete model or adapter directory, for checkpoints and the final
model alike; checkpoints also hold accelerate's FSDP model and optimizer state
(`pytorch_model_fsdp.bin`, `optimizer.bin`), which `--resume_from_checkpoint` loads back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen_finetune.errors import ArgumentError

if TYPE_CHECKING:
    from transformers import Trainer

    from qwen_finetune.args import LoraArguments, TrainingArguments
    from qwen_finetune.training_mode import TrainingMode

logger = logging.getLogger(__name__)

FSDP_VERSION = 2
CONSOLIDATED_STATE_DICT = "FULL_STATE_DICT"
SEVERAL_PROCESSES = "torchrun --nproc_per_node N finetune.py ... --fsdp (N >= 2)"


def read_fsdp_config(value: str | dict[str, Any]) -> dict[str, Any]:
    """--fsdp_config as a dict: a JSON file, JSON text (`{...}`) or a dict; an ArgumentError when
    the file is missing or is not a JSON object."""
    if isinstance(value, dict):
        return value
    text = value
    if not value.lstrip().startswith("{"):
        path = Path(value)
        if not path.is_file():
            raise ArgumentError(
                f"--fsdp_config {value}: no such file; give a JSON file or JSON text such as "
                "'{\"reshard_after_forward\": true}'"
            )
        text = path.read_text(encoding="utf-8")
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ArgumentError(
            f"--fsdp_config {value}: invalid JSON at line {error.lineno} column {error.colno}: {error.msg}"
        ) from error
    if not isinstance(config, dict):
        raise ArgumentError(f"--fsdp_config {value}: expected a JSON object of FSDP settings")
    return config


def check_fsdp_request(
    training_args: TrainingArguments, mode: TrainingMode, lora_args: LoraArguments
) -> None:
    """Refuse, before any weight is loaded, an FSDP request this run cannot honour.

    Checked in this order: the flags among themselves, then the training mode, then the number of
    processes, so that a one-process check of the flags reports what is wrong with them first."""
    if not training_args.fsdp:
        if training_args.fsdp_config:
            raise ArgumentError("--fsdp_config applies only with --fsdp; add --fsdp or drop --fsdp_config")
        return
    _check_settings(training_args)
    if mode.quantization is not None:
        raise ArgumentError(
            f"--fsdp cannot shard a Q-LoRA run: the {mode.quantization} base weights are not sharded by FSDP "
            "(GPTQ's packed weights are buffers, NF4's 4-bit weights are left out of the shards), so every "
            "process would still hold the whole base. Drop --fsdp: Q-LoRA trains on several processes as "
            "plain data parallel or under DeepSpeed ZeRO-2 (--deepspeed finetune/ds_config_zero2.json)"
        )
    # imported here: args.py reads --fsdp_config through this module, and training_mode imports args
    from qwen_finetune.training_mode import mutates_base_weights

    init = lora_args.init_lora_weights
    if mode.method != "full" and mode.adapter_to_continue is None and mutates_base_weights(init):
        raise ArgumentError(
            f"--init_lora_weights {init} with --fsdp: turning the trained adapter back into plain LoRA at the "
            "end needs the whole initial and trained adapters in one process, which FSDP does not keep; use the "
            "default initialisation, or train without --fsdp (plain data parallel or DeepSpeed ZeRO-2)"
        )
    processes = training_args.world_size
    if processes < 2:
        raise ArgumentError(
            f"--fsdp shards the model across processes, but this run has {processes}; start several with "
            f"{SEVERAL_PROCESSES}, or drop --fsdp"
        )


def _check_settings(training_args: TrainingArguments) -> None:
    if training_args.deepspeed:
        raise ArgumentError(
            "--fsdp and --deepspeed both shard the model; choose one (the DeepSpeed launch scripts pass "
            "--deepspeed unless given --deepspeed none)"
        )
    plugin_args = training_args.fsdp_plugin_args
    if plugin_args is None:  # transformers builds no plugin for XLA's own FSDP
        raise ArgumentError(
            "--fsdp_config xla: FSDP on XLA devices (TPUs) is not supported; drop the xla settings"
        )
    version = plugin_args.get("fsdp_version")
    if version != FSDP_VERSION:
        raise ArgumentError(
            f"--fsdp_config version {version}: only FSDP2 (version 2, the default) is supported; FSDP1 is "
            "deprecated by transformers. Drop the version setting"
        )
    state_dict_type = str(plugin_args.get("state_dict_type", CONSOLIDATED_STATE_DICT)).upper()
    if state_dict_type != CONSOLIDATED_STATE_DICT:
        raise ArgumentError(
            f"--fsdp_config state_dict_type {state_dict_type}: the Trainer would then save no model directory; "
            f"use {CONSOLIDATED_STATE_DICT} (the default), which saves the model consolidated from all processes"
        )
    if training_args.use_cpu and plugin_args.get("cpu_offload"):
        raise ArgumentError(
            "--fsdp offload / --fsdp_config cpu_offload: this run is on the CPU, where the parameters already "
            "live in CPU memory; drop the offload setting"
        )
    if plugin_args.get("activation_checkpointing") and training_args.activation_checkpointing:
        raise ArgumentError(
            "--fsdp_config activation_checkpointing and --gradient_checkpointing both checkpoint activations; "
            "keep one (FSDP's own saves an all-gather per layer in the backward pass)"
        )
    if training_args.save_only_model and training_args.load_best_model_at_end:
        raise ArgumentError(
            "--save_only_model with --load_best_model_at_end cannot work under --fsdp (the best checkpoint "
            "would have no FSDP state to load back); drop one of them"
        )


def activate_fsdp_on_cpu(trainer: Trainer) -> None:
    """Hand the requested FSDP plugin to accelerate on a CPU run, where accelerate dropped it.

    Call right after the Trainer created its Accelerator (QwenTrainer.create_accelerator_and_postprocess):
    accelerate is then switched to FSDP exactly as its own state setup does on GPU — the plugin with
    the mixed precision of the run, the FSDP distributed type for the accelerator and the process
    state — and the Trainer prepares the model with `fully_shard` (FSDP2, gloo). Does nothing when
    FSDP was not requested or accelerate already runs it (GPU); any other setup is an error, never
    a run without sharding."""
    plugin_args = trainer.args.fsdp_plugin_args
    if plugin_args is None or trainer.is_fsdp_enabled:
        return
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise ArgumentError(
            f"--fsdp: accelerate set this run up as {state.distributed_type.value}, where FSDP cannot run; "
            f"start several CPU processes with {SEVERAL_PROCESSES}"
        )
    plugin = FullyShardedDataParallelPlugin(**plugin_args)
    if state.mixed_precision != "no":
        plugin.set_mixed_precision(state.mixed_precision)
    state.fsdp_plugin = plugin
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    trainer.is_fsdp_enabled = True
    logger.info(
        "FSDP2 on %d CPU processes (gloo): each holds 1/%d of the weights, gradients and optimizer state",
        state.num_processes,
        state.num_processes,
    )

"""Load the tokenizer and the model a training mode asks for: a PreTrainedModel or a PeftModel."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, cast

import torch

import qwen_model  # noqa: F401  (registers the Qwen classes with transformers' Auto factories)
from qwen_finetune.args import LoraArguments, TrainingArguments
from qwen_finetune.errors import ArgumentError
from qwen_finetune.lora_dropout import use_sampled_lora_dropout
from qwen_finetune.quant_backends import BACKENDS
from qwen_finetune.tokenizer_protocol import QwenTokenizerLike
from qwen_finetune.training_mode import EMBEDDING_MODULES, TrainingMode

logger = logging.getLogger(__name__)


def load_tokenizer(checkpoint_path: str | Path, model_max_length: int) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(checkpoint_path), model_max_length=model_max_length)
    except (OSError, ValueError) as error:
        raise ArgumentError(
            f"cannot load the tokenizer of {checkpoint_path}: {error}. The directory needs qwen.tiktoken and "
            "tokenizer_config.json as in the released checkpoints"
        ) from error
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(
    mode: TrainingMode, lora_args: LoraArguments, training_args: TrainingArguments
) -> torch.nn.Module:
    """The model to hand to the Trainer: a PreTrainedModel (full) or a PeftModel (LoRA, Q-LoRA)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {
        "dtype": mode.dtype,
        "attn_implementation": attention_backend(mode, training_args),
    }
    backend = BACKENDS[mode.quantization] if mode.quantization is not None else None
    if backend is not None:
        kwargs["device_map"] = {"": str(training_args.device)}
        kwargs.update(backend.load_kwargs(mode.dtype))
    pretrained = AutoModelForCausalLM.from_pretrained(str(mode.checkpoint.path), **kwargs)
    pretrained.config.use_cache = False
    model: torch.nn.Module = pretrained
    if mode.method == "full":
        return model
    if backend is not None:
        from peft import prepare_model_for_kbit_training

        # The Trainer turns on activation checkpointing itself (--gradient_checkpointing).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = _attach_adapter(model, mode, lora_args)
    if training_args.device.type == "cpu":
        replaced = use_sampled_lora_dropout(model)
        if replaced:
            logger.info("LoRA dropout: numpy SFC64 masks in front of %d adapters", replaced)
    if backend is not None:
        backend.prepare_for_training(model)
    return model


def fill_special_token_ids(model: torch.nn.Module, tokenizer: QwenTokenizerLike) -> None:
    """Give the configs the tokenizer's end-of-text id where they name no eos / pad token.

    Released Qwen config.json files name none; the Trainer would fill them in itself, with a warning on
    every run. Ids a config does name are left to the Trainer's own check.
    """
    configs = [getattr(model, "config", None), getattr(model, "generation_config", None)]
    for name in ("eos_token_id", "pad_token_id"):
        token = getattr(tokenizer, name, None)
        for config in configs:
            if token is not None and config is not None and getattr(config, name, None) is None:
                setattr(config, name, token)


def attention_backend(mode: TrainingMode, training_args: TrainingArguments) -> str:
    """flash_attention_2 where it can run (CUDA, half precision, flash-attn installed): its varlen kernel
    gives packed rows the cost of separate samples; sdpa (attention per packed sample) otherwise."""
    half_precision = mode.dtype in (torch.bfloat16, torch.float16)
    on_cuda = training_args.device.type == "cuda"
    if on_cuda and half_precision and importlib.util.find_spec("flash_attn") is not None:
        logger.info("attention: flash_attention_2 (flash-attn installed)")
        return "flash_attention_2"
    return "sdpa"


def _attach_adapter(model: torch.nn.Module, mode: TrainingMode, lora_args: LoraArguments) -> torch.nn.Module:
    from peft import LoraConfig, PeftModel, get_peft_model

    if mode.adapter_to_continue is not None:
        logger.info("continuing the adapter %s (its own LoRA settings apply)", mode.adapter_to_continue)
        return PeftModel.from_pretrained(model, str(mode.adapter_to_continue), is_trainable=True)
    config = LoraConfig(
        r=lora_args.lora_r,
        lora_alpha=lora_args.lora_alpha,
        lora_dropout=lora_args.lora_dropout,
        target_modules=lora_args.lora_target_modules,
        bias=lora_args.lora_bias,
        use_dora=lora_args.use_dora,
        use_rslora=lora_args.use_rslora,
        init_lora_weights=cast(Any, lora_args.peft_init_lora_weights),  # PEFT's Literal has no pissa_niter_N
        modules_to_save=list(EMBEDDING_MODULES) if mode.train_embeddings else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)

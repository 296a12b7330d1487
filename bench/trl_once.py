"""Child process of the benchmark: train one configuration with TRL (SFTTrainer or DPOTrainer), the peer.

    python bench/trl_once.py CONFIG_JSON MODEL_DIR WORK_DIR [--profile PATH]

What a user of TRL would run on the same checkpoint, data, adapters, optimizer and token budget as the
toolkit's runs (configs.py): the conversations as a `messages` dataset (peer_data.py), tokenised by
TRL through the tokenizer's chat template with its assistant masks (`assistant_only_loss`), packed by
best-fit decreasing into rows of model_max_length (`packing_strategy="bfd"`, which makes the rows
padding-free: one row per micro-batch, position ids restarting per sample), LoRA from peft with the
toolkit's default settings, TRL's own loss (its chunked log-probabilities over the LM head) and its
default optimizer implementation. float32 weights and no gradient checkpointing, as in the toolkit's
runs. DPO: the pairs in TRL's conversational preference format, its sigmoid loss with the same beta,
the reference being the policy with its adapter switched off (TRL's default for a peft model), its
dynamic padding (its padding-free mode is unavailable for DPO) and its own defaults otherwise (it
switches dropout off). measure.py adds the same timestamps and token records as for the toolkit.

Prints one result line (see memory.emit_result); the parent reads this process's peak RSS itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import psutil
import torch
from configs import (
    ADAM_BETA2,
    DATA_FILES,
    DPO_BETA,
    DPO_DATA_FILES,
    SEED,
    WEIGHT_DECAY,
    BenchConfig,
    learning_rate,
)
from measure import RecordingCollator, StepTimer, TimedMicroBatches, measure, model_dimensions, start_timing
from memory import emit_result
from peer_data import messages_rows, preference_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="BenchConfig as JSON")
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--profile", type=Path, help="write a torch.profiler table of the last step here")
    cli = parser.parse_args()
    config = BenchConfig(**json.loads(cli.config))
    logging.basicConfig(level=logging.WARNING)

    started = time.perf_counter()
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

    import qwen_model  # noqa: F401  (registers the Qwen classes with transformers' Auto factories)
    from qwen_finetune.args import LoraArguments

    micro_batch, accumulation = config.micro_batch_and_accumulation
    common: dict[str, Any] = {
        "output_dir": str(cli.work_dir),
        "max_length": config.max_length,
        "per_device_train_batch_size": micro_batch,
        "gradient_accumulation_steps": accumulation,
        "max_steps": config.steps,
        "learning_rate": learning_rate(config),
        "lr_scheduler_type": "constant",
        "weight_decay": WEIGHT_DECAY,
        "adam_beta2": ADAM_BETA2,
        "gradient_checkpointing": False,
        "bf16": False,
        "fp16": False,
        "use_cpu": True,
        "logging_steps": 1_000_000,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": SEED,
    }
    defaults = LoraArguments()
    adapters = LoraConfig(
        r=defaults.lora_r,
        lora_alpha=defaults.lora_alpha,
        lora_dropout=defaults.lora_dropout,
        target_modules=defaults.lora_target_modules,
        bias=defaults.lora_bias,
        task_type="CAUSAL_LM",
    )
    tokenizer = AutoTokenizer.from_pretrained(str(cli.model_dir))
    if config.stage == "dpo":
        from trl import DPOConfig, DPOTrainer

        class TimedDPOTrainer(TimedMicroBatches, DPOTrainer):
            """DPOTrainer with timestamped micro-batches (see measure.py)."""

        trainer_class: Any = TimedDPOTrainer
        peer = "DPOTrainer"
        arguments: Any = DPOConfig(**common, loss_type=["sigmoid"], beta=DPO_BETA)
        dataset = Dataset.from_list(preference_rows(DPO_DATA_FILES))
    else:
        from trl import SFTConfig, SFTTrainer

        class TimedSFTTrainer(TimedMicroBatches, SFTTrainer):
            """SFTTrainer with timestamped micro-batches (see measure.py)."""

        trainer_class = TimedSFTTrainer
        peer = "SFTTrainer"
        arguments = SFTConfig(
            **common, packing=True, packing_strategy="bfd", padding_free=True, assistant_only_loss=True
        )
        dataset = Dataset.from_list(messages_rows(DATA_FILES))
    set_seed(SEED)
    model = AutoModelForCausalLM.from_pretrained(
        str(cli.model_dir), dtype=torch.float32, attn_implementation="sdpa"
    )
    rss_after_load = psutil.Process().memory_info().rss
    trainer = trainer_class(
        model=model, args=arguments, train_dataset=dataset, processing_class=tokenizer, peft_config=adapters
    )
    start_timing(trainer, RecordingCollator(trainer.data_collator))
    timer = StepTimer(config.steps if cli.profile else None, cli.profile)
    trainer.add_callback(timer)
    setup_seconds = time.perf_counter() - started
    metrics = trainer.train().metrics
    peft_model: Any = trainer.model
    trainable, total = peft_model.get_nb_trainable_parameters()
    prepared: Any = trainer.train_dataset
    emit_result(
        {
            "config": config.to_dict(),
            "trl_arguments": {
                key: value for key, value in arguments.to_dict().items() if _reported_setting(key, value)
            },
            "plan": f"TRL {peer}, LoRA (peft), weights loaded as torch.float32",
            "lora_rank": adapters.r,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "train_loss": metrics.get("train_loss"),
            "setup_seconds": setup_seconds,
            "rss_after_load_bytes": rss_after_load,
            "train_rows": len(prepared),
            "attention": getattr(model.config, "_attn_implementation", None),
            "model_dimensions": model_dimensions(model.config),
            "data": _prepared_data(prepared, len(dataset)),
            **measure(trainer, timer),
        }
    )


REPORTED_SETTINGS = (
    "max_length",
    "loss_type",
    "beta",
    "disable_dropout",
    "precompute_ref_log_probs",
    "packing",
    "packing_strategy",
    "padding_free",
    "assistant_only_loss",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "learning_rate",
    "weight_decay",
    "adam_beta2",
    "optim",
    "gradient_checkpointing",
    "bf16",
)


def _reported_setting(key: str, value: Any) -> bool:
    plain = isinstance(value, (str, int, float, bool)) or (
        isinstance(value, list) and all(isinstance(item, str) for item in value)
    )
    return key in REPORTED_SETTINGS and plain


def _prepared_data(prepared: Any, given: int) -> dict[str, int]:
    """What TRL's prepared dataset holds: rows given, samples kept (packed SFT rows count theirs), tokens."""
    columns = prepared.column_names
    if "seq_lengths" in columns:  # packed conversations
        tokens = sum(len(ids) for ids in prepared["input_ids"])
        return {
            "given": given,
            "samples_kept": sum(len(row) for row in prepared["seq_lengths"]),
            "total_tokens": tokens,
        }
    tokens = sum(
        2 * len(prompt) + len(chosen) + len(rejected)
        for prompt, chosen, rejected in zip(
            prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"]
        )
    )
    return {"given": given, "samples_kept": len(prepared), "total_tokens": tokens}


if __name__ == "__main__":
    main()

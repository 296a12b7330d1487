"""Write a checkpoint directory that can be used on its own, for intermediate and final saves alike.

Full models: sharded safetensors (`model-0000N-of-0000M.safetensors` + index, consolidated from
all processes under ZeRO-3), config.json with `auto_map` and the portable model code, so the
directory loads anywhere with `trust_remote_code=True`, or with `import qwen_model`.
Adapters: PEFT format (adapter_config.json + adapter_model.safetensors) that
`peft.AutoPeftModelForCausalLM.from_pretrained(dir)` loads; the base model is found through the
absolute path in adapter_config.json.
Both get the tokenizer files (qwen.tiktoken, tokenizer_config.json) and generation_config.json.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

GENERATION_CONFIG = "generation_config.json"
TRAINING_ARGS = "training_args.bin"


def is_adapter(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def save_checkpoint_dir(
    model: torch.nn.Module,
    output_dir: str | Path,
    *,
    state_dict: dict[str, torch.Tensor] | None,
    is_main_process: bool,
    tokenizer: Any,
    source_checkpoint: Path,
    chatml_trained: bool,
    max_shard_size: str,
    training_args: Any,
) -> None:
    """Save `model` (unwrapped) into `output_dir`.

    Every process calls this (a ZeRO-3 `state_dict` was gathered collectively before); only the
    main process writes. `chatml_trained`: the run trained the embeddings on ChatML data, so the
    written generation config says chat_format "chatml" (what `--train_embeddings auto` reads).
    """
    output = Path(output_dir)
    if is_adapter(model):
        model.save_pretrained(output, state_dict=state_dict, is_main_process=is_main_process)
    else:
        model.save_pretrained(
            output, state_dict=state_dict, is_main_process=is_main_process, max_shard_size=max_shard_size
        )
    if not is_main_process:
        return
    tokenizer.save_pretrained(output)
    write_generation_config(source_checkpoint, output, chatml_trained)
    if is_adapter(model):
        copy_model_code(output)
    else:
        from qwen_model.portable import write_portable_code

        write_portable_code(output)
    torch.save(training_args, output / TRAINING_ARGS)
    logger.info("saved %s to %s", "adapter" if is_adapter(model) else "model", output)


def write_generation_config(source_checkpoint: Path, output: Path, chatml_trained: bool) -> None:
    """The base checkpoint's generation_config.json, unchanged except chat_format after ChatML training."""
    source = source_checkpoint / GENERATION_CONFIG
    config: dict[str, Any] = json.loads(source.read_text(encoding="utf-8")) if source.is_file() else {}
    if chatml_trained and config.get("chat_format") != "chatml":
        logger.info(
            "chat_format %r -> 'chatml' in %s (embeddings trained on ChatML)",
            config.get("chat_format"),
            output,
        )
        config["chat_format"] = "chatml"
    if config:
        (output / GENERATION_CONFIG).write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )


def copy_model_code(output: Path) -> None:
    """The flat model files beside an adapter, so that its tokenizer_config.json `auto_map` resolves
    with `trust_remote_code=True` (peft's AutoPeftModel loads the tokenizer from the adapter dir)."""
    from qwen_model.portable import FLAT_MODEL_FILES, PACKAGE_DIR

    for name in FLAT_MODEL_FILES:
        shutil.copyfile(PACKAGE_DIR / name, output / name)

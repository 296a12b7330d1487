"""Writing a complete model directory: the one job every command that produces a model shares.

A complete directory loads on its own, like the released checkpoints: weights, config, the tokenizer
(vocabulary, tokenizer_config.json with its chat template), generation_config.json and the model's
own code with `auto_map`, so `trust_remote_code=True` works anywhere and `import qwen_model` works
here. Full models and adapters (PEFT format, found through the base path in adapter_config.json) get
the same treatment; training runs also keep their arguments.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeGuard

import torch

from qwen_finetune.checkpoint_info import (
    ADAPTER_CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    TRAINING_ARGS_FILE,
    VOCAB_FILE,
)
from qwen_finetune.errors import InputFileError
from qwen_finetune.tokenizer_protocol import QwenTokenizerLike

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

# Beside a PiSSA/OLoRA run's outputs: the adapter as initialised (a directory name PEFT can use as an
# adapter name, so no dot in it).
INITIAL_ADAPTER_DIR = "initial_adapter"


def is_peft_model(model: torch.nn.Module) -> TypeGuard[PeftModel]:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def load_tokenizer_of(sources: Sequence[Path]) -> Any:
    """The tokenizer of the first directory that has a vocabulary (an adapter's own, else its base's)."""
    from transformers import AutoTokenizer

    import qwen_model  # noqa: F401  (registers the Qwen tokenizer with AutoTokenizer)

    source = next((directory for directory in sources if (directory / VOCAB_FILE).is_file()), None)
    if source is None:
        looked = ", ".join(str(directory) for directory in sources)
        raise InputFileError(
            f"no {VOCAB_FILE} found in {looked}: the output would have no tokenizer; copy the vocabulary "
            "next to the model (bash scripts/setup.sh puts one in qwen_model/)"
        )
    return AutoTokenizer.from_pretrained(str(source))


def write_generation_config(sources: Sequence[Path], directory: Path, chatml_trained: bool = False) -> None:
    """The first source's generation_config.json, unchanged except chat_format after ChatML training.

    `chatml_trained`: the run trained the embeddings on ChatML data, so the written config says
    chat_format "chatml" (what `--train_embeddings auto` and chat() read).
    """
    source = next(
        (path / GENERATION_CONFIG_FILE for path in sources if (path / GENERATION_CONFIG_FILE).is_file()), None
    )
    config: dict[str, Any] = json.loads(source.read_text(encoding="utf-8")) if source is not None else {}
    if chatml_trained and config.get("chat_format") != "chatml":
        logger.info(
            "chat_format %r -> 'chatml' in %s (embeddings trained on ChatML)",
            config.get("chat_format"),
            directory,
        )
        config["chat_format"] = "chatml"
    if config:
        (directory / GENERATION_CONFIG_FILE).write_text(
            json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8"
        )


def complete_model_dir(
    directory: Path,
    *,
    tokenizer: QwenTokenizerLike,
    generation_sources: Sequence[Path],
    adapter: bool = False,
    chatml_trained: bool = False,
) -> None:
    """Add to a directory that holds weights and config everything else a usable checkpoint needs."""
    from qwen_model.portable import copy_model_files, write_portable_code

    tokenizer.save_pretrained(directory)
    write_generation_config(generation_sources, directory, chatml_trained)
    if adapter:
        copy_model_files(directory)  # the tokenizer_config's auto_map resolves with trust_remote_code
    else:
        write_portable_code(directory)


def save_initial_adapter(model: PeftModel, output_dir: Path) -> Path:
    """Keep the adapter as PiSSA or OLoRA initialised it, before training (main process).

    Those initialisations subtract the adapter's starting value from the base weights in memory. The
    final save uses this copy to turn the trained adapter into a plain LoRA adapter (twice the rank) of
    the checkpoint's own, unchanged base, which any LoRA loader, merge_lora.py included, can use. A
    resumed run keeps the copy its first run wrote.
    """
    path = output_dir / INITIAL_ADAPTER_DIR
    if (path / ADAPTER_CONFIG_FILE).is_file():
        return path
    from peft import LoraConfig

    config = model.peft_config["default"]
    assert isinstance(config, LoraConfig), "PiSSA and OLoRA are LoRA initialisations"
    initialisation = config.init_lora_weights
    config.init_lora_weights = True  # loading the copy back must not decompose the base a second time
    try:
        model.save_pretrained(str(path))
    finally:
        config.init_lora_weights = initialisation
    return path


def save_trained_model(
    model: PreTrainedModel | PeftModel,
    directory: str | Path,
    *,
    state_dict: dict[str, torch.Tensor] | None,
    tokenizer: QwenTokenizerLike,
    source_checkpoint: Path,
    chatml_trained: bool,
    max_shard_size: str,
    training_args: Any,
    initial_adapter: Path | None = None,
) -> None:
    """Save a trained model (unwrapped) or adapter, for intermediate and final saves alike.

    Called on the main process only; under ZeRO-3 `state_dict` was gathered from all processes before.
    `initial_adapter` (PiSSA / OLoRA, final save): convert the adapter to plain LoRA of the original base,
    see `save_initial_adapter`; checkpoints for resuming keep the adapter as trained.
    """
    output = Path(directory)
    adapter = is_peft_model(model)
    if adapter and initial_adapter is not None:
        # PEFT's conversion reads the live adapter and fails on a state dict handed in (DeepSpeed always
        # hands one). The live weights are the whole ones here: PiSSA / OLoRA are refused under ZeRO-3
        # and FSDP, the two set-ups that partition them.
        model.save_pretrained(str(output), path_initial_model_for_weight_conversion=str(initial_adapter))
    elif adapter:
        model.save_pretrained(str(output), state_dict=state_dict)
    else:
        model.save_pretrained(str(output), state_dict=state_dict, max_shard_size=max_shard_size)
    complete_model_dir(
        output,
        tokenizer=tokenizer,
        generation_sources=[source_checkpoint],
        adapter=adapter,
        chatml_trained=chatml_trained,
    )
    torch.save(training_args, output / TRAINING_ARGS_FILE)
    logger.info("saved %s to %s", "adapter" if adapter else "model", output)

"""What a checkpoint directory says about itself, read without loading any weight.

The names of the files in a checkpoint are defined here once; readers (the training mode decision,
merge, quantize, chat, export) and the writer (model_dir.py) share them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen_finetune.errors import ArgumentError
from qwen_finetune.json_files import read_json

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
VOCAB_FILE = "qwen.tiktoken"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
TRAINING_ARGS_FILE = "training_args.bin"
# Written by run_gptq.py next to a GPTQ checkpoint; records the full-precision source model.
QUANTIZE_REPORT_FILE = "quantize_report.json"
# Written by every training run at its end: mode, steps, tokens, throughput, peak memory.
TRAIN_SUMMARY_FILE = "train_summary.json"
# Written before a run loads its weights: the planned memory per device and its components.
MEMORY_PLAN_FILE = "memory_plan.json"
# Written by gptqmodel and read by older loaders; the same content as config.json's quantization_config.
QUANTIZE_CONFIG_FILE = "quantize_config.json"


@dataclass(frozen=True)
class Checkpoint:
    """A full model directory: its config, generation config and where each tensor is stored."""

    path: Path
    config: dict[str, Any]
    generation_config: dict[str, Any]
    tensor_files: dict[str, Path] = field(repr=False)  # tensor name -> safetensors file (empty for .bin)

    @property
    def quantization_config(self) -> dict[str, Any] | None:
        quantization = self.config.get("quantization_config")
        return quantization if isinstance(quantization, dict) else None

    @property
    def quant_method(self) -> str | None:
        method = (self.quantization_config or {}).get("quant_method")
        if method is None and (self.path / QUANTIZE_CONFIG_FILE).is_file():
            method = "gptq"
        return method

    @property
    def module_names(self) -> set[str]:
        return {name.rsplit(".", 1)[0] for name in self.tensor_files}


def read_checkpoint(directory: str | Path | None, flag: str = "--model_name_or_path") -> Checkpoint:
    """Read a local Qwen (v1) checkpoint; `flag` names the option it came from in error messages."""
    if not directory:
        raise ArgumentError(f"{flag} is required: a local Qwen checkpoint directory")
    path = Path(directory).expanduser().resolve()
    if not (path / CONFIG_FILE).is_file():
        raise ArgumentError(
            f"{flag} {directory}: no {CONFIG_FILE} there. Give a local checkpoint directory; nothing is "
            "downloaded (fetch hub models first, e.g. `huggingface-cli download Qwen/Qwen-7B-Chat "
            "--local-dir DIR`)"
        )
    config = read_json(path / CONFIG_FILE)
    if config.get("model_type") != "qwen":
        raise ArgumentError(
            f"{path / CONFIG_FILE} has model_type {config.get('model_type')!r}; this toolkit works with "
            "Qwen (v1) checkpoints (model_type 'qwen')"
        )
    generation = path / GENERATION_CONFIG_FILE
    return Checkpoint(
        path=path,
        config=config,
        generation_config=read_json(generation) if generation.is_file() else {},
        tensor_files=_tensor_files(path),
    )


def _tensor_files(path: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file, from the shard index or the single file's header."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map", {})
        return {name: path / file for name, file in weight_map.items()}
    single = path / "model.safetensors"
    if single.is_file():
        with safe_open(single, framework="pt") as handle:
            return dict.fromkeys(handle.keys(), single)
    return {}


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG_FILE).is_file()


def quantization_config_of(model_dir: Path) -> dict[str, Any] | None:
    """The `quantization_config` of a checkpoint's config.json, or None for a full-precision one."""
    config_file = model_dir / CONFIG_FILE
    if not config_file.is_file():
        return None
    quantization = read_json(config_file).get("quantization_config")
    return quantization if isinstance(quantization, dict) else None

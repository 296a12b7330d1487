"""Make a checkpoint directory loadable anywhere with `trust_remote_code=True`, as released ones are.

The flat model files are copied next to the weights and `auto_map` entries point transformers at
them, so a plain transformers + torch + tiktoken environment (nothing of ours installed) loads
config, model and tokenizer from the directory alone.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
FLAT_MODEL_FILES = (
    "configuration_qwen.py",
    "modeling_qwen.py",
    "tokenization_qwen.py",
    "qwen_generation_utils.py",
    "chunked_loss.py",
    "chat_format.py",
)
CONFIG_AUTO_MAP = {
    "AutoConfig": "configuration_qwen.QWenConfig",
    "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
}
TOKENIZER_AUTO_MAP = {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}


def _add_auto_map(json_path: Path, auto_map: dict[str, Any]) -> None:
    """Merge our entries into the file's auto_map, keeping everything else as it is."""
    content = json.loads(json_path.read_text(encoding="utf-8"))
    content["auto_map"] = {**content.get("auto_map", {}), **auto_map}
    json_path.write_text(
        json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
    )


def copy_model_files(directory: str | os.PathLike) -> list[Path]:
    """Copy the flat model files into `directory` (an adapter directory needs them for its tokenizer's
    auto_map); returns the files written."""
    return [Path(shutil.copyfile(PACKAGE_DIR / name, Path(directory) / name)) for name in FLAT_MODEL_FILES]


def write_portable_code(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """Copy the flat model files into `checkpoint_dir` and set the auto_map of config.json and, if
    the directory has a tokenizer, tokenizer_config.json. Returns the files written."""
    directory = Path(checkpoint_dir)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{config_path} not found: write_portable_code needs a saved model directory "
            "(model.save_pretrained(dir) first)"
        )
    written = copy_model_files(directory)
    _add_auto_map(config_path, CONFIG_AUTO_MAP)
    written.append(config_path)
    tokenizer_config_path = directory / "tokenizer_config.json"
    if tokenizer_config_path.is_file():
        _add_auto_map(tokenizer_config_path, TOKENIZER_AUTO_MAP)
        written.append(tokenizer_config_path)
    return written

"""Writing self-contained checkpoint directories: all or nothing, never over the user's inputs.

Every command that produces a model directory (merge, quantize) builds it in a hidden staging
directory next to the target and renames it into place at the end, so an interrupted or failed
run leaves either the old directory or the complete new one, never half of it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from qwen_finetune.errors import OutputDirError
from qwen_model.configuration_qwen import PRECISION_FLAG_DTYPES

# Tokenizer files of a Qwen checkpoint (the extra vocabulary only exists when a user added one).
TOKENIZER_FILES = ("qwen.tiktoken", "qwen_extra.tiktoken", "tokenizer_config.json", "special_tokens_map.json")
GENERATION_CONFIG_FILE = "generation_config.json"
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
# Written by run_gptq.py next to a GPTQ checkpoint; records the full-precision source model.
QUANTIZE_REPORT_FILE = "quantize_report.json"
DTYPES_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def log_to_stderr(prefix: str) -> None:
    """Show this package's INFO messages on stderr, prefixed, without changing other libraries' logging."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[{prefix}] %(message)s"))
    package_logger = logging.getLogger("qwen_finetune")
    package_logger.handlers[:] = [handler]
    package_logger.setLevel(logging.INFO)
    package_logger.propagate = False


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, with the file named in the error when it is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{path} is not valid JSON (line {error.lineno}, column {error.colno}): {error.msg}"
        ) from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} should hold a JSON object, found {type(value).__name__}")
    return value


def write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def is_adapter_dir(path: Path) -> bool:
    return (path / ADAPTER_CONFIG_FILE).is_file()


def quantization_config_of(model_dir: Path) -> dict[str, Any] | None:
    """The `quantization_config` of a checkpoint's config.json, or None for a full-precision one."""
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        return None
    quantization = read_json(config_file).get("quantization_config")
    return quantization if isinstance(quantization, dict) else None


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(
    out_dir: str | os.PathLike, overwrite: bool, inputs: Sequence[str | os.PathLike] = ()
) -> Path:
    """Validate `out_dir` before any expensive work; returns it as an absolute path.

    Refused: a file in its place, a non-empty directory without `overwrite`, a location we
    cannot write, and a directory that is (or contains) one of `inputs`, which replacing it
    would destroy.
    """
    target = Path(out_dir).expanduser().resolve()
    if target.exists() and not target.is_dir():
        raise OutputDirError(f"output path {target} exists and is not a directory; choose a directory path")
    for source in inputs:
        source_path = Path(source).expanduser().resolve()
        if source_path == target or target in source_path.parents:
            raise OutputDirError(
                f"output directory {target} would replace the input {source_path}; choose another output directory"
            )
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputDirError(
            f"output directory {target} is not empty; pass --overwrite to replace it, or choose another directory"
        )
    parent = _nearest_existing(target.parent)
    if not parent.is_dir():
        raise OutputDirError(f"cannot create the output directory {target}: {parent} is not a directory")
    try:  # a real attempt: permission bits say nothing for root or on read-only file systems
        tempfile.TemporaryDirectory(prefix=f".{target.name}.probe-", dir=parent).cleanup()
    except OSError as error:
        raise OutputDirError(
            f"cannot write the output directory {target}: {parent} is not writable ({error})"
        ) from None
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def staged_output_dir(
    out_dir: str | os.PathLike, overwrite: bool, inputs: Sequence[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield an empty staging directory beside `out_dir`; on success it becomes `out_dir`.

    On any error the staging directory is removed and an existing `out_dir` is left untouched.
    """
    target = check_output_dir(out_dir, overwrite, inputs)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    except OSError as error:
        raise OutputDirError(f"cannot create the output directory {target}: {error}") from None
    try:
        yield staging
        staging.chmod(0o777 & ~_umask())
        _replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_dir(staging: Path, target: Path) -> None:
    """Move `staging` to `target`; an old `target` is moved aside first and deleted last."""
    if not target.exists():
        os.rename(staging, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.rename(target, old / target.name)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(old / target.name, target)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def copy_tokenizer_and_generation_files(sources: Sequence[Path], dst: Path) -> list[str]:
    """Copy the tokenizer files and generation config to `dst`, each from the first source holding it.

    Returns the names copied. The vocabulary is required: without it the directory is not usable.
    """
    copied = []
    for name in (*TOKENIZER_FILES, GENERATION_CONFIG_FILE):
        source = next((directory / name for directory in sources if (directory / name).is_file()), None)
        if source is not None:
            shutil.copyfile(source, dst / name)
            copied.append(name)
    if "qwen.tiktoken" not in copied:
        looked = ", ".join(str(directory) for directory in sources)
        raise FileNotFoundError(
            f"no qwen.tiktoken found in {looked}: the output would have no tokenizer; copy the vocabulary "
            "next to the model (bash scripts/setup.sh puts one in qwen_model/)"
        )
    return copied


def write_portable_code(dst: Path) -> None:
    """Put the model's own Python files next to the weights so `trust_remote_code=True` loads it anywhere."""
    from qwen_model.portable import write_portable_code as write

    write(dst)


def dtype_from_name(name: str) -> torch.dtype:
    if name not in DTYPES_BY_NAME:
        raise ValueError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES_BY_NAME)}")
    return DTYPES_BY_NAME[name]


def checkpoint_dtype(config: Any) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in: its bf16/fp16/fp32 flag, else its `dtype` field."""
    for flag, dtype in PRECISION_FLAG_DTYPES.items():
        if getattr(config, flag, False) is True:
            return dtype
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, torch.dtype):
        return stored
    if isinstance(stored, str) and stored in DTYPES_BY_NAME:
        return DTYPES_BY_NAME[stored]
    return torch.float32


def set_precision_flags(config: Any, dtype: torch.dtype) -> None:
    """Make the config describe weights stored in `dtype`.

    The bundled model loads in the dtype a bf16/fp16/fp32 flag names; a flag left over from the
    source checkpoint would load the new weights in the wrong precision. Without any flag set,
    loading follows the `dtype` field.
    """
    config.dtype = dtype
    if any(getattr(config, flag, False) is True for flag in PRECISION_FLAG_DTYPES):
        for flag, flag_dtype in PRECISION_FLAG_DTYPES.items():
            setattr(config, flag, flag_dtype == dtype)

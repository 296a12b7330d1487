"""JSON objects read from and written to the files of checkpoints and runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qwen_finetune.errors import InputFileError


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; the error names the file and what is wrong with it."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise InputFileError(f"cannot read {path}: {error.strerror or error}") from None
    except json.JSONDecodeError as error:
        raise InputFileError(
            f"{path} is not valid JSON (line {error.lineno}, column {error.colno}): {error.msg}"
        ) from None
    if not isinstance(value, dict):
        raise InputFileError(f"{path} should hold a JSON object, found {type(value).__name__}")
    return value


def write_json(path: Path, value: dict[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

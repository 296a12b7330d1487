"""The dtype a checkpoint is stored in, read from and written to its config."""

from __future__ import annotations

from typing import Any

import torch

from qwen_finetune.errors import ArgumentError
from qwen_model.configuration_qwen import PRECISION_FLAG_DTYPES

DTYPES_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def dtype_from_name(name: str) -> torch.dtype:
    if name not in DTYPES_BY_NAME:
        raise ArgumentError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES_BY_NAME)}")
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

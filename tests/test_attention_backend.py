"""Training picks flash-attention 2 only where it can run, and sdpa everywhere else."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from qwen_finetune import model_loading


def _choose(device: str, dtype: torch.dtype) -> str:
    mode = SimpleNamespace(dtype=dtype)
    training_args = SimpleNamespace(device=torch.device(device))
    return model_loading.attention_backend(mode, training_args)


@pytest.mark.parametrize(
    ("device", "dtype", "flash_installed", "expected"),
    [
        ("cuda", torch.bfloat16, True, "flash_attention_2"),
        ("cuda", torch.float16, True, "flash_attention_2"),
        ("cuda", torch.float32, True, "sdpa"),
        ("cuda", torch.bfloat16, False, "sdpa"),
        ("cpu", torch.bfloat16, True, "sdpa"),
    ],
)
def test_attention_backend(monkeypatch, device, dtype, flash_installed, expected) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, *args):
        if name == "flash_attn":
            return object() if flash_installed else None
        return real_find_spec(name, *args)

    monkeypatch.setattr(model_loading.importlib.util, "find_spec", find_spec)
    assert _choose(device, dtype) == expected

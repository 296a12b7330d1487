"""4-bit NF4 quantization of a full-precision checkpoint while it loads (bitsandbytes)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import QuantBackend

if TYPE_CHECKING:
    import torch


def load_kwargs(compute_dtype: torch.dtype) -> dict[str, Any]:
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
    )
    return {"quantization_config": config}


def prepare_for_training(model: torch.nn.Module) -> None:
    disable_cpu_repacking(model)


def disable_cpu_repacking(model: torch.nn.Module) -> None:
    """On CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights at the first eval-mode forward,
    which later breaks backward ("a view of a leaf Variable ... in-place operation")."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


BACKEND = QuantBackend(
    required_packages=("bitsandbytes",),
    load_kwargs=load_kwargs,
    prepare_for_training=prepare_for_training,
)

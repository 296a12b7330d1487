"""GPTQ Int4/Int8 checkpoints (gptqmodel kernels, loaded through transformers + optimum)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .base import QuantBackend

if TYPE_CHECKING:
    import torch


def load_kwargs(compute_dtype: torch.dtype) -> dict[str, Any]:
    """The checkpoint's own quantization_config describes the weights: nothing to add."""
    return {}


def prepare_for_training(model: torch.nn.Module) -> None:
    keep_cpu_kernels_differentiable(model)


def keep_cpu_kernels_differentiable(model: torch.nn.Module) -> int:
    """Pin gptqmodel's CPU int4 kernels (TorchAtenLinear) to their differentiable path.

    At its first eval-mode forward without grad (an evaluation during training) the kernel
    switches itself for good to a bf16 packed matmul that runs under no_grad: later training
    steps would silently get no gradient through the quantized layers, and evaluations would
    see different numbers than training. Returns the number of layers pinned.
    """
    pinned = 0
    for module in model.modules():
        if type(module).__module__.startswith("gptqmodel.") and getattr(module, "linear_mode", "") is None:
            setattr(module, "linear_mode", "train")  # noqa: B010  (an attribute torch does not declare)
            pinned += 1
    return pinned


BACKEND = QuantBackend(
    required_packages=("gptqmodel", "optimum"),
    load_kwargs=load_kwargs,
    prepare_for_training=prepare_for_training,
)

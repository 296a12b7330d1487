"""The interface every quantization backend of a Q-LoRA base provides."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the backends import nothing heavy: unused_backends reads them before torch loads
    import torch


@dataclass(frozen=True)
class QuantBackend:
    # Packages that must be importable before any weight is loaded.
    required_packages: tuple[str, ...]
    # Extra `from_pretrained` arguments that make transformers load the base quantized.
    load_kwargs: Callable[[torch.dtype], dict[str, Any]]
    # What the quantized layers need once the adapter is attached, before the first step.
    prepare_for_training: Callable[[torch.nn.Module], None]

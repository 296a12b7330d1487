"""LoRA's input dropout on the CPU, with keep-masks from numpy's SFC64 generator.

PEFT puts an `nn.Dropout` in front of every adapter. On the CPU PyTorch draws its mask with `bernoulli_`
(one Mersenne Twister call per element) into a float tensor that autograd keeps: about a tenth of a
LoRA step went there in the benchmark's profiles. This dropout is the same Bernoulli(1 - p) mask with
the same 1 / (1 - p) scale, drawn from SFC64 (a 64-bit word gives two 32-bit uniforms) and kept as one
byte per element. Each mask's generator is seeded by one draw from torch's default generator, so
`torch.manual_seed`, activation checkpointing's recompute and a resumed run's restored RNG state all
reproduce it. GPUs keep PyTorch's fused dropout, which is already fast and keeps a byte mask.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

_UNIFORM_LEVELS = 2**32  # a draw is a uint32: p is resolved to 2**-32


def _scaled_where_kept(values: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """`values * scale` where kept, 0 elsewhere, in one new tensor: the same numbers as
    `torch.where(keep, values * scale, 0)` without its second input-sized temporary."""
    return torch.where(keep, values, 0.0).mul_(scale)


class _ScaleKept(torch.autograd.Function):
    """`x * keep * scale`, keeping only the boolean mask for the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(keep)
        ctx.scale = scale
        return _scaled_where_kept(x, keep, scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (keep,) = ctx.saved_tensors
        return _scaled_where_kept(grad, keep, ctx.scale), None, None


def keep_mask(shape: torch.Size, p: float) -> torch.Tensor:
    """A boolean tensor of `shape` whose elements are True with probability 1 - p, independently."""
    count = math.prod(shape)
    seed = int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64).item())
    words = np.random.SFC64(seed).random_raw((count + 1) // 2)
    uniforms = words.view(np.uint32)[:count]
    keep = uniforms >= np.uint32(round(p * _UNIFORM_LEVELS))
    return torch.from_numpy(keep).view(shape)


class SampledDropout(nn.Module):
    """Dropout with probability p whose mask comes from `keep_mask`; the identity in eval mode."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 < p < 1.0:
            raise ValueError(f"dropout probability {p} must be in (0, 1)")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return _ScaleKept.apply(x, keep_mask(x.shape, self.p), 1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}, masks=numpy SFC64"


def lora_dropout_slots(model: nn.Module) -> Iterator[tuple[nn.ModuleDict, str, nn.Module]]:
    """(ModuleDict, adapter name, module) for each dropout in front of a LoRA adapter.

    PEFT keeps these in each LoRA layer's `lora_dropout` ModuleDict (one entry per adapter name), and
    uses `nn.Identity` there when the dropout is 0. Entries may be replaced while iterating.
    """
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict):
            for adapter, dropout in list(dropouts.items()):
                yield dropouts, adapter, dropout


def use_sampled_lora_dropout(model: nn.Module) -> int:
    """Put SampledDropout in place of the `nn.Dropout` in front of each LoRA adapter; returns how many."""
    replaced = 0
    for dropouts, adapter, dropout in lora_dropout_slots(model):
        if type(dropout) is nn.Dropout and dropout.p > 0:
            dropouts[adapter] = SampledDropout(dropout.p)
            replaced += 1
    return replaced

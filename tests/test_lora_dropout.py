"""The CPU LoRA dropout: PyTorch's dropout semantics (rate, scale, gradient, eval identity), masks that
torch's seed, activation checkpointing and RNG-state restores reproduce, one byte kept per element,
and every adapter of a CPU LoRA model using it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from qwen_finetune.args import parse_args
from qwen_finetune.lora_dropout import SampledDropout, keep_mask, use_sampled_lora_dropout
from qwen_finetune.model_loading import load_model
from qwen_finetune.training_mode import choose_training_mode

ELEMENTS = 1 << 22


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_elements_are_dropped_independently_at_rate_p(p: float) -> None:
    torch.manual_seed(0)
    dropped = ~keep_mask(torch.Size([ELEMENTS]), p)
    sigma = (p * (1 - p) / ELEMENTS) ** 0.5
    assert abs(dropped.double().mean().item() - p) < 5 * sigma
    # the two 32-bit halves of each 64-bit word, and neighbouring words, are independent draws
    for first, second in ((dropped[0::2], dropped[1::2]), (dropped[1:-1:2], dropped[2::2])):
        both = (first & second).double().mean().item()
        pair_sigma = (p * p * (1 - p * p) / first.numel()) ** 0.5
        assert abs(both - p * p) < 5 * pair_sigma


def test_forward_and_gradient_are_dropout_with_the_drawn_mask() -> None:
    p, dropout = 0.2, SampledDropout(0.2)
    x = torch.randn(64, 96, requires_grad=True)
    upstream = torch.randn(64, 96)
    torch.manual_seed(7)
    mask = keep_mask(x.shape, p)
    torch.manual_seed(7)
    out = dropout(x)
    torch.testing.assert_close(out, torch.where(mask, x / (1 - p), 0.0), rtol=1e-6, atol=0)
    scale = 1.0 / (1.0 - p)
    assert torch.equal(out, torch.where(mask, x * scale, 0.0))  # bit for bit: x * scale or 0
    out.backward(upstream)
    assert x.grad is not None
    torch.testing.assert_close(x.grad, torch.where(mask, upstream / (1 - p), 0.0), rtol=1e-6, atol=0)
    assert torch.equal(x.grad, torch.where(mask, upstream * scale, 0.0))
    assert torch.equal(out == 0, ~mask | (x == 0))


def test_masks_follow_torch_seed_and_differ_between_draws() -> None:
    shape = torch.Size([32, 512])
    torch.manual_seed(3)
    first, second = keep_mask(shape, 0.5), keep_mask(shape, 0.5)
    torch.manual_seed(3)
    assert torch.equal(keep_mask(shape, 0.5), first)
    assert not torch.equal(first, second)
    state = torch.get_rng_state()
    again = keep_mask(shape, 0.5)
    torch.set_rng_state(state)
    assert torch.equal(keep_mask(shape, 0.5), again)


def test_identity_in_eval_mode() -> None:
    dropout = SampledDropout(0.5).eval()
    x = torch.randn(8, 8)
    assert dropout(x) is x


def test_backward_keeps_a_boolean_mask_and_nothing_when_no_gradient_is_needed() -> None:
    saved: list[torch.Tensor] = []

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor)
        return tensor

    dropout = SampledDropout(0.1)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        dropout(torch.randn(16, 32, requires_grad=True))
        assert [(t.dtype, t.shape) for t in saved] == [(torch.bool, torch.Size([16, 32]))]
        saved.clear()
        dropout(torch.randn(16, 32))
        assert saved == []


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_recomputes_the_same_mask(reentrant: bool) -> None:
    torch.manual_seed(0)
    layer = nn.Sequential(
        SampledDropout(0.3), nn.Linear(48, 48), nn.Tanh(), SampledDropout(0.3), nn.Linear(48, 8)
    )
    x = torch.randn(40, 48, requires_grad=True)

    def gradients(checkpointed: bool) -> list[torch.Tensor]:
        layer.zero_grad()
        x.grad = None
        torch.manual_seed(11)
        out = checkpoint(layer, x, use_reentrant=reentrant) if checkpointed else layer(x)
        out.square().sum().backward()
        assert x.grad is not None
        return [x.grad.clone(), *(p.grad.clone() for p in layer.parameters() if p.grad is not None)]

    plain, recomputed = gradients(False), gradients(True)
    assert len(plain) == len(recomputed) == 5
    for expected, actual in zip(plain, recomputed):
        assert torch.equal(actual, expected)


def _lora_model(checkpoint_path: Path, workdir: Path, dropout: str) -> nn.Module:
    argv = [
        "--model_name_or_path",
        str(checkpoint_path),
        "--use_lora",
        "--lora_r",
        "4",
        "--lora_dropout",
        dropout,
    ]
    model_args, _, training_args, lora_args = parse_args([*argv, "--output_dir", str(workdir / "unused")])
    return load_model(choose_training_mode(model_args, lora_args, training_args), lora_args, training_args)


def test_every_adapter_of_a_cpu_lora_model_uses_it(tiny_chat_checkpoint: Path, tmp_path: Path) -> None:
    model = _lora_model(tiny_chat_checkpoint, tmp_path, "0.05")
    adapters = [
        module
        for module in model.modules()
        if isinstance(getattr(module, "lora_dropout", None), nn.ModuleDict)
    ]
    dropouts = [module.lora_dropout["default"] for module in adapters]
    assert adapters and all(isinstance(d, SampledDropout) and d.p == 0.05 for d in dropouts)
    assert not any(type(module) is nn.Dropout and module.p > 0 for module in model.modules())
    assert use_sampled_lora_dropout(model) == 0  # nothing left to replace

    without = _lora_model(tiny_chat_checkpoint, tmp_path, "0")
    assert not any(isinstance(module, SampledDropout) for module in without.modules())

"""The fused training loss (gradients formed in the forward pass) against full logits: its cache-blocked
softmax, and the lm_heads it serves: a PEFT modules_to_save copy (trainable embeddings under LoRA), the
original head while adapters are disabled, and the heads it must leave to the checkpointed path."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from model_helpers import micro_config
from peft import LoraConfig, get_peft_model
from torch import nn

import qwen_model.chunked_loss as chunked_loss
from qwen_model import QWenLMHeadModel

VOCAB = 384
TARGETS = ["c_attn", "c_proj", "w1", "w2"]


def random_model(seed: int = 0) -> QWenLMHeadModel:
    torch.manual_seed(seed)
    model = QWenLMHeadModel(micro_config(VOCAB))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.normal_(0.0, 0.2)
    return model


def batch() -> dict[str, torch.Tensor]:
    input_ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[0, :3] = -100
    labels[1, 8:] = -100
    return {"input_ids": input_ids, "labels": labels}


def loss_and_grads(model: nn.Module, skip_logits: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of one step; 2.5x the loss is backpropagated, as a loss scale would."""
    model.zero_grad(set_to_none=True)
    output = model(**batch(), skip_logits=skip_logits)
    (2.5 * output.loss).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return output.loss.item(), grads


@pytest.fixture
def fused_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls of the fused loss; small chunks so that every test runs several of them."""
    monkeypatch.setattr(chunked_loss, "LOSS_CHUNK_TOKENS", 4)
    calls: list[int] = []
    real_apply = chunked_loss._LinearCrossEntropySum.apply

    def counting_apply(*args: Any) -> Any:
        calls.append(1)
        return real_apply(*args)

    monkeypatch.setattr(chunked_loss._LinearCrossEntropySum, "apply", counting_apply)
    return calls


def assert_same_step(model: nn.Module) -> dict[str, torch.Tensor]:
    fused_loss, fused_grads = loss_and_grads(model, skip_logits=True)
    full_loss, full_grads = loss_and_grads(model, skip_logits=False)
    assert fused_loss == pytest.approx(full_loss, abs=1e-6)
    assert fused_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():  # softmax - one-hot vs log-softmax backward: float32 rounding
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-5, atol=1e-5, msg=name)
    return fused_grads


@pytest.mark.parametrize("rows_per_block", [1, 3, 1000])
def test_blocked_softmax_gives_the_cross_entropy_and_its_gradients(
    monkeypatch: pytest.MonkeyPatch, rows_per_block: int
) -> None:
    """Rows taken 1, 3 (a last block shorter than the others) or all at a time, over several chunks."""
    monkeypatch.setattr(chunked_loss, "LOSS_CHUNK_TOKENS", 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    monkeypatch.setattr(chunked_loss, "SOFTMAX_BLOCK_BYTES_PER_THREAD", rows_per_block * VOCAB * 4)
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(21, 16, generator=generator, requires_grad=True)
    weight = torch.randn(VOCAB, 16, generator=generator).mul_(0.5).requires_grad_(True)
    targets = torch.randint(0, VOCAB, (21,), generator=generator)

    fused = chunked_loss._LinearCrossEntropySum.apply(features, weight, targets)
    fused_grads = torch.autograd.grad(3.0 * fused, (features, weight))
    reference = F.cross_entropy(features @ weight.t(), targets, reduction="sum")
    reference_grads = torch.autograd.grad(3.0 * reference, (features, weight))

    assert fused.item() == pytest.approx(reference.item(), rel=1e-6)
    for got, expected in zip(fused_grads, reference_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_logits_buffer_is_kept_between_calls_and_leaks_nothing_into_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A call after a longer one reuses its buffer (same storage, its stale logits overwritten) and still
    gives the full-logits loss and gradients; another vocabulary replaces the buffer."""
    monkeypatch.setattr(chunked_loss, "LOSS_CHUNK_TOKENS", 8)
    monkeypatch.setattr(chunked_loss, "_scratch_by_device", {})
    generator = torch.Generator().manual_seed(0)

    def fused_against_full(rows: int, vocab: int) -> None:
        features = torch.randn(rows, 16, generator=generator, requires_grad=True)
        weight = torch.randn(vocab, 16, generator=generator).requires_grad_(True)
        targets = torch.randint(0, vocab, (rows,), generator=generator)
        fused = chunked_loss._LinearCrossEntropySum.apply(features, weight, targets)
        reference = F.cross_entropy(features @ weight.t(), targets, reduction="sum")
        assert fused.item() == pytest.approx(reference.item(), rel=1e-6)
        for got, expected in zip(
            torch.autograd.grad(fused, (features, weight)), torch.autograd.grad(reference, (features, weight))
        ):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    def kept() -> torch.Tensor:
        return chunked_loss._scratch_by_device[torch.device("cpu")]

    fused_against_full(21, VOCAB)
    first = kept()
    assert first.shape == (8, VOCAB)
    fused_against_full(5, VOCAB)
    assert kept().data_ptr() == first.data_ptr()
    fused_against_full(3, VOCAB // 2)
    assert kept().shape == (3, VOCAB // 2)
    fused_against_full(6, VOCAB // 2)  # more rows than kept: the buffer grows
    assert kept().shape == (6, VOCAB // 2)


def test_trainable_embeddings_under_lora_take_the_fused_path(fused_calls: list[int]) -> None:
    """PEFT wraps the trainable lm_head (modules_to_save): the fused loss resolves the copy being trained."""
    model = get_peft_model(
        random_model(),
        LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["wte", "lm_head"]),
    ).train()
    head = model.get_output_embeddings()
    trained_copy = head.modules_to_save["default"]
    assert chunked_loss.fusable_weight(head) is trained_copy.weight

    grads = assert_same_step(model)
    assert fused_calls
    trained = [name for name in grads if "lm_head" in name]
    assert trained == ["base_model.model.lm_head.modules_to_save.default.weight"]
    assert grads[trained[0]].abs().sum() > 0


def test_disabled_adapters_resolve_to_the_original_head(fused_calls: list[int]) -> None:
    """With adapters disabled (a reference model's pass, as preference training does) the wrapper calls the
    original lm_head, and so does the fused loss: the loss is the base model's."""
    base = random_model()
    with torch.no_grad():
        base_loss = base(**batch()).loss.item()
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, modules_to_save=["lm_head"])
    ).train()
    head = model.get_output_embeddings()
    with torch.no_grad():  # make the trainable copy differ from the original
        head.modules_to_save["default"].weight.mul_(1.5)
    with model.disable_adapter():
        assert chunked_loss.fusable_weight(head) is head.original_module.weight
        loss = model(**batch(), skip_logits=True).loss
    assert fused_calls
    assert loss.item() == pytest.approx(base_loss, abs=1e-6)


def test_adapter_on_the_head_itself_is_left_to_the_checkpointed_path(fused_calls: list[int]) -> None:
    """LoRA on lm_head adds its own matmuls (its B starts at zero, so the output alone would look like the
    base layer's): the head is not a pass-through, and the checkpointed path computes the same step."""
    model = get_peft_model(
        random_model(), LoraConfig(r=4, lora_alpha=8, target_modules=[*TARGETS, "lm_head"])
    ).train()
    assert chunked_loss.fusable_weight(model.get_output_embeddings()) is None
    grads = assert_same_step(model)
    assert not fused_calls
    assert any("lm_head.lora_B" in name for name in grads)


class Scaled(nn.Module):
    """A head that changes what its linear layer returns."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2.0 * self.linear(x)


class Pass(nn.Module):
    """A head that only forwards to its linear layer."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_only_pass_through_heads_without_hooks_are_fused() -> None:
    linear = nn.Linear(8, VOCAB, bias=False)
    assert chunked_loss.fusable_weight(Pass(linear)) is linear.weight
    assert chunked_loss.fusable_weight(Scaled(linear)) is None
    assert chunked_loss.fusable_weight(Pass(nn.Linear(8, VOCAB, bias=True))) is None
    hooked = Pass(linear)
    hooked.register_forward_pre_hook(lambda module, args: None)
    assert chunked_loss.fusable_weight(hooked) is None
    assert not linear._forward_hooks  # the probe leaves no hook behind


def test_a_head_that_changes_its_output_still_trains_correctly(fused_calls: list[int]) -> None:
    model = random_model().train()
    model.lm_head = Scaled(model.lm_head)
    assert_same_step(model)
    assert not fused_calls

"""The training loss of the Qwen causal LM: next-token cross entropy without the full logits.

A flat module (torch only), copied next to checkpoints with the model files. The final hidden states
of the supervised positions are projected to the vocabulary in chunks of LOSS_CHUNK_TOKENS, so a
[tokens x 151,936] float32 logits tensor never exists; a plain lm_head forms its gradients during
the forward pass (`_LinearCrossEntropySum`), anything else is checkpointed per chunk.
"""

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
# Tokens per chunk of the training loss: bounds the float32 [chunk x vocab] logits alive at once
# (256 x 151,936 x 4 B = 156 MB; bench/README.md measured 1024 at 2048 tokens: 3.43 -> 2.11 GiB peak).
LOSS_CHUNK_TOKENS = 256


def _shift_targets(labels: torch.Tensor) -> torch.Tensor:
    """Targets for next-token prediction: `labels[:, t + 1]` at position t, ignored at the last position.

    Packed rows need no special case: the data pipeline sets each sample's first label to -100, so the
    prediction made at the last token of one sample towards the next sample is ignored.
    """
    targets = labels.new_full(labels.shape, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def _projected_cross_entropy_sum(
    project: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    return _cross_entropy_sum(project(features), targets)


class _LinearCrossEntropySum(torch.autograd.Function):
    """Sum of the cross entropy of `features @ weight.T` (float32 logits), with its gradients computed
    during the forward pass, chunk by chunk.

    Per chunk of LOSS_CHUNK_TOKENS rows the logits are formed once; softmax minus the one-hot target is
    their gradient, which gives the chunk's feature gradient and adds to the weight's. Backward only
    scales what was stored by the incoming gradient. Compared with checkpointing each chunk this skips
    the recomputed projection and the separate log-softmax backward, and it never holds more than one
    chunk of logits. Gradients are computed only for the inputs that need them.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, features: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        feature_grad = torch.empty_like(features) if ctx.needs_input_grad[0] else None
        weight_grad = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        total = features.new_zeros((), dtype=torch.float32)
        for part in _chunks(targets.numel(), LOSS_CHUNK_TOKENS):
            chunk, chunk_targets = features[part], targets[part]
            logits = (chunk @ weight.t()).float()
            log_normaliser = torch.logsumexp(logits, dim=-1)
            total += (log_normaliser - logits.gather(1, chunk_targets[:, None]).squeeze(1)).sum()
            logits_grad = logits.sub_(log_normaliser[:, None]).exp_()  # softmax, in place
            logits_grad[torch.arange(len(chunk_targets), device=logits.device), chunk_targets] -= 1
            logits_grad = logits_grad.to(weight.dtype)
            if feature_grad is not None:
                feature_grad[part] = logits_grad @ weight
            if weight_grad is not None:
                # addmm_ in its out= form, which torch's FLOP counter also sees (bench tests rely on it)
                torch.addmm(weight_grad, logits_grad.t(), chunk, out=weight_grad)
        ctx.save_for_backward(feature_grad, weight_grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        feature_grad, weight_grad = ctx.saved_tensors
        return (
            feature_grad * grad_total.to(feature_grad.dtype) if feature_grad is not None else None,
            weight_grad * grad_total.to(weight_grad.dtype) if weight_grad is not None else None,
            None,
        )


def _fusable_weight(project: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    """The weight of a projection the fused loss may use directly, or None.

    Only a plain bias-free nn.Linear without hooks qualifies: wrappers (PEFT modules_to_save, quantized
    layers), forward hooks (accelerate offload) and DeepSpeed ZeRO-3 parameters (partitioned outside
    their module's forward) must be called as modules, so they take the checkpointed path.
    """
    if type(project) is not nn.Linear or project.bias is not None:
        return None
    if project._forward_hooks or project._forward_pre_hooks or hasattr(project, "_hf_hook"):
        return None
    if hasattr(project.weight, "ds_id"):
        return None
    return project.weight


def _chunks(total: int, size: int) -> Iterator[slice]:
    """Slices covering range(total) in steps of `size`; one empty slice when total is 0 (keeps the graph)."""
    for start in range(0, max(total, 1), size):
        yield slice(start, start + size)


def _cross_entropy_sum_in_chunks(
    features: torch.Tensor, targets: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor] | None
) -> torch.Tensor:
    """Summed cross entropy of the supervised rows (see `causal_lm_loss`)."""
    training = project is not None and torch.is_grad_enabled()
    weight = _fusable_weight(project) if training else None
    if weight is not None:
        return _LinearCrossEntropySum.apply(features, weight, targets)
    total = None
    for part in _chunks(targets.numel(), LOSS_CHUNK_TOKENS):
        if project is None:
            chunk_loss = _cross_entropy_sum(features[part], targets[part])
        elif training:
            chunk_loss = checkpoint(
                _projected_cross_entropy_sum, project, features[part], targets[part], use_reentrant=False
            )
        else:
            chunk_loss = _projected_cross_entropy_sum(project, features[part], targets[part])
        total = chunk_loss if total is None else total + chunk_loss
    return total


def causal_lm_loss(
    features: torch.Tensor,
    labels: torch.Tensor,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
    num_items_in_batch: torch.Tensor | int | None = None,
) -> torch.Tensor:
    """Next-token cross entropy over the supervised tokens (labels != -100), shifted here.

    `features` are logits ([b, t, vocab]) when `project` is None, else final hidden states that `project`
    (the lm_head) maps to logits chunk by chunk: only supervised tokens are projected, in chunks of
    LOSS_CHUNK_TOKENS upcast to float32, and backward keeps no chunk's logits: a plain lm_head goes through
    `_LinearCrossEntropySum` (gradients formed in the forward pass), anything else is checkpointed per chunk.
    Reduction: sum / num_items_in_batch when given (HF Trainer gradient accumulation), else the mean over
    supervised tokens (0, not NaN, when there is none).
    """
    targets = _shift_targets(labels.to(features.device)).reshape(-1)
    supervised = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    features = features.reshape(-1, features.shape[-1]).index_select(0, supervised)
    targets = targets.index_select(0, supervised)
    total = _cross_entropy_sum_in_chunks(features, targets, project)
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / max(targets.numel(), 1)

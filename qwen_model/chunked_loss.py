"""The training loss of the Qwen causal LM: next-token cross entropy without the full logits.

A flat module (torch only), copied next to checkpoints with the model files. The final hidden states
of the supervised positions are projected to the vocabulary in chunks of LOSS_CHUNK_TOKENS, so a
[tokens x 151,936] float32 logits tensor never exists. When the projection is, or only forwards to,
a plain bias-free nn.Linear, the gradients are formed during the forward pass
(`_LinearCrossEntropySum`); anything else is checkpointed per chunk.
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
# Bytes of logits per torch thread turned into probabilities at a time: small enough to stay in a core's
# L2 cache, so the log-softmax and the exp read and write each chunk's logits in memory once (one
# 151,936-column float32 row is 0.6 MB).
SOFTMAX_BLOCK_BYTES_PER_THREAD = 1 << 20


def shift_targets(labels: torch.Tensor) -> torch.Tensor:
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


def _softmax_minus_one_hot_(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Turn float32 `logits` ([rows x vocab]) in place into softmax minus the one-hot of `targets`, the
    gradient of the summed cross entropy; return that sum.

    Rows are taken a cache-sized block at a time (a few rows per thread): the block's log-softmax goes
    into a small scratch buffer, from which the log-probabilities of the targets are read and the exp is
    written back.
    """
    rows = logits.shape[0]
    row_bytes = max(logits.shape[1] * logits.element_size(), 1)
    block_rows = max(1, SOFTMAX_BLOCK_BYTES_PER_THREAD // row_bytes) * torch.get_num_threads()
    scratch = logits.new_empty((min(block_rows, rows), logits.shape[1]))
    target_log_probs = logits.new_empty((rows, 1))
    columns = targets[:, None]
    for start in range(0, rows, block_rows):
        block = logits[start : start + block_rows]
        log_probs = scratch[: block.shape[0]]
        torch.log_softmax(block, dim=-1, out=log_probs)
        stop = start + block.shape[0]
        torch.gather(log_probs, 1, columns[start:stop], out=target_log_probs[start:stop])
        torch.exp(log_probs, out=block)
    logits[torch.arange(rows, device=logits.device), targets] -= 1
    return -target_log_probs.sum()


_scratch_by_device: dict[torch.device, torch.Tensor] = {}


def _logits_scratch(rows: int, vocab: int, device: torch.device) -> torch.Tensor:
    """A float32 [rows x vocab] buffer that lives between calls, one per device.

    Every training step needs the same 156 MB chunk of logits; allocated afresh, each step faults its
    pages in again (on a CPU, 4 KB at a time), which costs about as much as a fifth of the chunk's
    projection. The buffer is replaced by a larger one when more rows are asked for, or when the
    vocabulary changes.
    """
    kept = _scratch_by_device.pop(device, None)
    if kept is None or kept.shape[1] != vocab or kept.shape[0] < rows:
        del kept  # the old buffer is released before the new one is taken
        kept = torch.empty((rows, vocab), dtype=torch.float32, device=device)
    _scratch_by_device[device] = kept
    return kept[:rows]


def project_into_scratch(features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`features @ weight.T` as float32 logits, written into the buffer kept between calls; a float32
    weight multiplies straight into it. Callers must be done with the result before the next call: it is
    scratch, never saved for backward."""
    logits = _logits_scratch(features.shape[0], weight.shape[0], weight.device)
    if weight.dtype == torch.float32:
        return torch.mm(features, weight.t(), out=logits)
    return logits.copy_(features @ weight.t())


class _LinearCrossEntropySum(torch.autograd.Function):
    """Sum of the cross entropy of `features @ weight.T` (float32 logits), with its gradients computed
    during the forward pass, chunk by chunk.

    Per chunk of LOSS_CHUNK_TOKENS rows the logits are formed once, into one float32 buffer reused by
    every chunk and every call (`project_into_scratch`); softmax minus the
    one-hot target is their gradient, which gives the chunk's feature gradient and adds to the weight's.
    Backward only scales what was stored by the incoming gradient. Compared with checkpointing each
    chunk this skips the recomputed projection and the separate log-softmax backward. Gradients are
    computed only for the inputs that need them.
    """

    @staticmethod
    def forward(
        ctx: Any, features: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        feature_grad = torch.empty_like(features) if ctx.needs_input_grad[0] else None
        weight_grad = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        total = features.new_zeros((), dtype=torch.float32)
        for part in chunks(targets.numel(), LOSS_CHUNK_TOKENS):
            chunk, chunk_targets = features[part], targets[part]
            logits = project_into_scratch(chunk, weight)
            total += _softmax_minus_one_hot_(logits, chunk_targets)
            logits_grad = logits.to(weight.dtype)
            if feature_grad is not None:
                torch.mm(logits_grad, weight, out=feature_grad[part])
            if weight_grad is not None:
                # addmm_ in its out= form, which torch's FLOP counter also sees (bench tests rely on it)
                torch.addmm(weight_grad, logits_grad.t(), chunk, out=weight_grad)
        ctx.save_for_backward(feature_grad, weight_grad)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        feature_grad, weight_grad = ctx.saved_tensors
        return (
            feature_grad * grad_total.to(feature_grad.dtype) if feature_grad is not None else None,
            weight_grad * grad_total.to(weight_grad.dtype) if weight_grad is not None else None,
            None,
        )


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"))


def _linear_called_by(project: nn.Module) -> nn.Linear | None:
    """The nn.Linear that `project` is a pass-through to, found by watching one forward call: exactly one
    module with parameters runs, it is an nn.Linear, it receives the very input tensor `project` was given
    and `project` returns its very output. A wrapper that selects one of several copies (PEFT's
    modules_to_save keeps the original lm_head and a trainable one) then resolves to the copy that is
    active at this call; one that changes the input or output, or adds adapters, resolves to None.
    """
    candidates = [module for module in project.modules() if type(module) is nn.Linear]
    if not candidates:
        return None
    calls: list[tuple[nn.Module, Any, Any]] = []
    handles = [
        module.register_forward_hook(lambda module, args, output: calls.append((module, args, output)))
        for module in project.modules()
        if next(module.parameters(recurse=False), None) is not None
    ]
    weight = candidates[0].weight
    probe = torch.zeros((1, candidates[0].in_features), dtype=weight.dtype, device=weight.device)
    try:
        with torch.no_grad():
            output = project(probe)
    finally:
        for handle in handles:
            handle.remove()
    if len(calls) != 1:
        return None
    module, args, module_output = calls[0]
    if type(module) is not nn.Linear or len(args) != 1 or args[0] is not probe or module_output is not output:
        return None
    return module


def fusable_weight(project: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor | None:
    """The weight of a projection the fused loss may use directly, or None.

    A plain bias-free nn.Linear qualifies, and so does a module that only forwards to one (resolved per
    call by `_linear_called_by`, e.g. PEFT's modules_to_save wrapper of a trainable lm_head). Forward
    hooks anywhere (accelerate offload), DeepSpeed ZeRO-3 parameters (partitioned outside their module's
    forward), quantized layers and adapters on the head itself take the checkpointed path instead.
    """
    if not isinstance(project, nn.Module) or any(_has_hooks(module) for module in project.modules()):
        return None
    linear = project if type(project) is nn.Linear else _linear_called_by(project)
    if linear is None or linear.bias is not None or hasattr(linear.weight, "ds_id"):
        return None
    return linear.weight


def chunks(total: int, size: int) -> Iterator[slice]:
    """Slices covering range(total) in steps of `size`; one empty slice when total is 0 (keeps the graph)."""
    for start in range(0, max(total, 1), size):
        yield slice(start, start + size)


def _cross_entropy_sum_in_chunks(
    features: torch.Tensor, targets: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor] | None
) -> torch.Tensor:
    """Summed cross entropy of the supervised rows (see `causal_lm_loss`)."""
    training = project is not None and torch.is_grad_enabled()
    weight = fusable_weight(project) if project is not None and training else None
    if weight is not None:
        return _LinearCrossEntropySum.apply(features, weight, targets)
    total = features.new_zeros((), dtype=torch.float32)
    for part in chunks(targets.numel(), LOSS_CHUNK_TOKENS):
        if project is None:
            chunk_loss = _cross_entropy_sum(features[part], targets[part])
        elif training:
            chunk_loss = checkpoint(
                _projected_cross_entropy_sum, project, features[part], targets[part], use_reentrant=False
            )
        else:
            chunk_loss = _projected_cross_entropy_sum(project, features[part], targets[part])
        total = total + chunk_loss
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
    LOSS_CHUNK_TOKENS upcast to float32, and backward keeps no chunk's logits: a plain lm_head (or a module
    that only forwards to one) goes through `_LinearCrossEntropySum` (gradients formed in the forward
    pass), anything else is checkpointed per chunk.
    Reduction: sum / num_items_in_batch when given (HF Trainer gradient accumulation), else the mean over
    supervised tokens (0, not NaN, when there is none).
    """
    targets = shift_targets(labels.to(features.device)).reshape(-1)
    supervised = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    features = features.reshape(-1, features.shape[-1]).index_select(0, supervised)
    targets = targets.index_select(0, supervised)
    total = _cross_entropy_sum_in_chunks(features, targets, project)
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    return total / max(targets.numel(), 1)

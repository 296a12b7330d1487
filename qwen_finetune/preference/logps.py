"""Per-sequence log-probabilities of the answers, from the final hidden states, without the full logits.

Only positions that predict a scored token are projected through the lm_head, in chunks of
LOSS_CHUNK_TOKENS, so a [tokens x 151,936] logits tensor never exists, in the forward pass or in
backward. A plain lm_head goes through `_LinearTokenLogps`, whose backward recomputes each chunk's
logits and forms their gradient in place (in the buffer chunked_loss.project_into_scratch keeps between
steps for the supervised loss too); any other head (LoRA-wrapped, hooked, ZeRO-3-partitioned:
see chunked_loss.fusable_weight) is called as a module with each chunk checkpointed. The
log-probabilities are summed per sequence of the batch (`sequence_index`, see collate.py), which
serves padded rows and packed rows alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from qwen_model.chunked_loss import (
    IGNORE_INDEX,
    LOSS_CHUNK_TOKENS,
    chunks,
    fusable_weight,
    project_into_scratch,
    shift_targets,
)

from .collate import SEQUENCE_INDEX
from .loss import PairLogps


def _token_logps(
    project: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    log_probs = torch.log_softmax(project(features).float(), dim=-1)
    return log_probs.gather(1, targets[:, None]).squeeze(1)


class _LinearTokenLogps(torch.autograd.Function):
    """log softmax(features @ weight.T)[target] per row (float32), chunk by chunk.

    The forward pass keeps only each row's log-normaliser. Backward recomputes a chunk's logits, turns
    them in place into their gradient, grad * (one-hot(target) - softmax), and multiplies it out into
    the feature and weight gradients: one chunk of logits alive at a time, no dense gather gradient.
    Both passes compute in the weight's dtype with autocast off, so that backward recomputes exactly
    the logits of the forward pass (backward runs outside any autocast region).
    """

    @staticmethod
    def forward(
        ctx: Any, features: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        logps = features.new_empty(targets.shape, dtype=torch.float32)
        log_normalisers = torch.empty_like(logps)
        with _autocast_off(features):
            for part in chunks(targets.numel(), LOSS_CHUNK_TOKENS):
                logits = project_into_scratch(features[part].to(weight.dtype), weight)
                log_normalisers[part] = torch.logsumexp(logits, dim=-1)
                logps[part] = logits.gather(1, targets[part, None]).squeeze(1) - log_normalisers[part]
        ctx.save_for_backward(features, weight, targets, log_normalisers)
        return logps

    @staticmethod
    def backward(ctx: Any, grad_logps: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        features, weight, targets, log_normalisers = ctx.saved_tensors
        feature_grad = torch.empty_like(features) if ctx.needs_input_grad[0] else None
        weight_grad = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        with _autocast_off(features):
            for part in chunks(targets.numel(), LOSS_CHUNK_TOKENS):
                chunk, grad = features[part].to(weight.dtype), grad_logps[part].float()
                logits_grad = project_into_scratch(chunk, weight)
                logits_grad.sub_(log_normalisers[part, None]).exp_()  # softmax
                logits_grad.mul_(-grad[:, None])
                logits_grad[torch.arange(len(grad), device=grad.device), targets[part]] += grad
                logits_grad = logits_grad.to(weight.dtype)
                if feature_grad is not None:
                    feature_grad[part] = logits_grad @ weight
                if weight_grad is not None:
                    weight_grad.addmm_(logits_grad.t(), chunk)
        return feature_grad, weight_grad, None


def _autocast_off(tensor: torch.Tensor) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast(tensor.device.type, enabled=False)


def scored_logps(
    hidden_states: torch.Tensor, labels: torch.Tensor, lm_head: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(label) at every position that predicts a label (labels not shifted by the caller, -100
    where nothing is predicted), and those positions in the flattened [rows x width] batch."""
    targets = shift_targets(labels).reshape(-1)
    positions = (targets != IGNORE_INDEX).nonzero().squeeze(1)
    features = hidden_states.reshape(-1, hidden_states.shape[-1]).index_select(0, positions)
    targets = targets.index_select(0, positions)
    training = torch.is_grad_enabled()
    weight = fusable_weight(lm_head) if training else None
    if weight is not None:
        return _LinearTokenLogps.apply(features, weight, targets), positions
    parts = []
    for part in chunks(targets.numel(), LOSS_CHUNK_TOKENS):
        if training:
            parts.append(
                # No metadata check of the recomputed tensors: ZeRO-3 frees a frozen lm_head weight in place
                # once its module has run, so the weight saved by the recomputation shows an empty shape;
                # DeepSpeed gathers it again before the backward step that reads it.
                checkpoint(
                    _token_logps,
                    lm_head,
                    features[part],
                    targets[part],
                    use_reentrant=False,
                    determinism_check="none",
                )
            )
        else:
            parts.append(_token_logps(lm_head, features[part], targets[part]))
    return torch.cat(parts), positions


def _per_sequence(
    token_logps: torch.Tensor, sequence: torch.Tensor, num_sequences: int
) -> tuple[torch.Tensor, torch.Tensor]:
    sums = token_logps.new_zeros(num_sequences).index_add(0, sequence, token_logps)
    return sums, torch.bincount(sequence, minlength=num_sequences)


def causal_lm(model: Any) -> Any:
    """The transformers causal LM inside the trainer's wrappers (DDP, DeepSpeed: `.module`) and PEFT's
    (its LoRA layers stay in place)."""
    while isinstance(getattr(model, "module", None), torch.nn.Module):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def _scoring_final_hidden_states(
    language_model: Any, labels: torch.Tensor
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """While active, each forward pass of the transformer body scores `labels` from its final hidden
    states (`scored_logps`) before the model's own lm_head call: inside the model's forward, so that
    wrappers' hooks and precision cover the projection too (ZeRO-3 gathers the head's weight there, also
    when backward recomputes a chunk)."""
    scored: list[tuple[torch.Tensor, torch.Tensor]] = []
    lm_head = language_model.get_output_embeddings()

    def score(module: torch.nn.Module, args: Any, output: Any) -> None:
        scored.append(scored_logps(output.last_hidden_state, labels, lm_head))

    handle = language_model.base_model.register_forward_hook(score)
    try:
        yield scored
    finally:
        handle.remove()


def _with_chosen_prompts(batch: dict[str, torch.Tensor], pairs: int) -> torch.Tensor:
    """Labels that also score the prompt tokens of the chosen sequences (each sequence's first token
    excepted: nothing predicts it)."""
    sequence_index = batch[SEQUENCE_INDEX]
    first = torch.ones_like(sequence_index, dtype=torch.bool)
    first[:, 1:] = sequence_index[:, 1:] != sequence_index[:, :-1]
    chosen = (sequence_index >= 0) & (sequence_index < pairs)
    return torch.where(chosen & ~first, batch["input_ids"], batch["labels"])


def pair_logps(model: Any, batch: dict[str, torch.Tensor], *, chosen_prompt_nll: bool = False) -> PairLogps:
    """One forward pass over a PairCollator batch (chosen and rejected sequences together): the
    answers' summed log-probabilities and token counts per pair. `model` is called as given, so any
    wrapper around it takes part (see the module docstring). `chosen_prompt_nll` also scores the
    chosen sequences whole, prompt included (TRL's ORPO NLL term). Gradients flow when enabled."""
    sequence_index = batch[SEQUENCE_INDEX]
    num_sequences = int(sequence_index.max()) + 1
    pairs = num_sequences // 2
    labels = batch["labels"]
    scored = _with_chosen_prompts(batch, pairs) if chosen_prompt_nll else labels
    with _scoring_final_hidden_states(causal_lm(model), scored) as results:
        model(
            input_ids=batch["input_ids"],
            attention_mask=batch.get("attention_mask"),
            position_ids=batch.get("position_ids"),
            use_cache=False,
            logits_to_keep=1,
        )
    [(token_logps, positions)] = results
    sequence = shift_targets(sequence_index).reshape(-1).index_select(0, positions)
    answer = shift_targets(labels).reshape(-1).index_select(0, positions) != IGNORE_INDEX
    sums, counts = _per_sequence(token_logps[answer], sequence[answer], num_sequences)
    logps = PairLogps(sums[:pairs], sums[pairs:], counts[:pairs], counts[pairs:])
    if chosen_prompt_nll:
        whole, whole_counts = _per_sequence(token_logps, sequence, num_sequences)
        logps.chosen_sequence, logps.chosen_sequence_tokens = whole[:pairs], whole_counts[:pairs]
    return logps

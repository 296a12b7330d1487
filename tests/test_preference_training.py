"""A few optimiser steps with each preference loss: the policy learns to prefer the chosen answers of
the training pairs (reward accuracy rises to 1, the margin grows, the loss falls).

A Qwen model with a 512-token vocabulary and random pairs keeps each step cheap; the pipeline's own
pairs and the full vocabulary are covered by test_preference_logps.py and test_preference_trl.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
from model_helpers import micro_config

from qwen_finetune.preference import (
    PREFERENCE_LOSSES,
    PairCollator,
    PreferenceArguments,
    pair_logps,
    preference_loss,
)

VOCAB = 512
PAIRS = 8
STEPS = 15


@pytest.fixture(scope="module")
def reference():
    from qwen_model import QWenLMHeadModel

    torch.manual_seed(0)
    return QWenLMHeadModel(micro_config(VOCAB, hidden=64, intermediate=256, positions=128)).eval()


@pytest.fixture(scope="module")
def batch():
    """Random pairs, packed (padded and packed batches give the same log-probabilities: see
    test_preference_logps.py)."""
    generator = torch.Generator().manual_seed(1)

    def tokens(count: int) -> list[int]:
        return torch.randint(3, VOCAB, (count,), generator=generator).tolist()

    features = []
    for _ in range(PAIRS):
        chosen, rejected = tokens(int(torch.randint(3, 9, (1,)))), tokens(int(torch.randint(3, 9, (1,))))
        features.append(
            {
                "prompt_ids": tokens(int(torch.randint(4, 12, (1,)))),
                "chosen_ids": chosen,
                "chosen_labels": chosen,
                "rejected_ids": rejected,
                "rejected_labels": rejected,
            }
        )
    return PairCollator(pad_token_id=0, max_length=64, packing=True)(features)


@pytest.mark.slow
@pytest.mark.parametrize("loss", PREFERENCE_LOSSES)
def test_each_loss_teaches_the_policy_to_prefer_the_chosen_answers(reference, batch, loss: str) -> None:
    policy = copy.deepcopy(reference).train()
    args = PreferenceArguments(
        stage="dpo",
        pref_loss=loss,
        pref_beta=2.0 if loss == "simpo" else 0.1,
        pref_label_smoothing=0.1 if loss == "robust" else 0.0,
    )
    reference_logps = None
    if args.needs_reference:
        with torch.no_grad():
            reference_logps = pair_logps(reference, batch)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    history = []
    for _ in range(STEPS):
        logps = pair_logps(policy, batch, chosen_prompt_nll=loss == "orpo")
        value, metrics = preference_loss(logps, reference_logps, args)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        history.append({"loss": value.item(), **{name: metric.item() for name, metric in metrics.items()}})
    first, last = history[0], history[-1]
    assert first["rewards/accuracies"] < 1.0
    assert last["loss"] < first["loss"]
    assert last["rewards/margins"] > first["rewards/margins"]
    assert last["rewards/accuracies"] == 1.0

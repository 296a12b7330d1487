"""Pair batches and per-sequence log-probabilities with the tiny model: padded and packed batches give
each sequence's log-probability as when it runs alone with full logits, in value and in gradient."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qwen_finetune.data import DataArguments
from qwen_finetune.data.chatml import IGNORE_INDEX
from qwen_finetune.preference import SEQUENCE_INDEX, PairCollator, make_preference_data, pair_logps
from qwen_finetune.preference.collate import pair_sequences
from qwen_model.chunked_loss import LOSS_CHUNK_TOKENS

MAX_LENGTH = 256
PAIRS = 6


@pytest.fixture(scope="module")
def model(tiny_chat_checkpoint: Path):
    from qwen_model import QWenLMHeadModel

    return QWenLMHeadModel.from_pretrained(tiny_chat_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def features(tokenizer, shared_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Short pairs of LLaMA-Factory's demo data (some with a system prompt, one prompt cut to fit)."""
    records = json.loads((shared_data_dir / "llamafactory_dpo_en_demo.json").read_text())
    chosen = [records[index] for index in (10, 23, 43, 54, 134, 181)]
    directory = tmp_path_factory.mktemp("pairs")
    (directory / "pairs.json").write_text(json.dumps(chosen, ensure_ascii=False))
    args = DataArguments(
        data_path=str(directory / "pairs.json"), data_cache_dir=str(directory / "cache"), truncation="cut"
    )
    data = make_preference_data(args, tokenizer, MAX_LENGTH)
    assert (data.report["train"]["samples_kept"], data.report["train"]["truncated"]) == (PAIRS, 1)
    return [data.train_dataset[index] for index in range(len(data.train_dataset))]


def alone(model, input_ids: list[int], labels: list[int], whole: bool = False) -> torch.Tensor:
    """Summed log-probability of the labelled tokens (or of every token but the first) with full logits."""
    logits = model(input_ids=torch.tensor([input_ids])).logits[0].float()
    token_logps = logits[:-1].log_softmax(-1).gather(1, torch.tensor(input_ids[1:])[:, None]).squeeze(1)
    scored = (
        torch.ones(len(input_ids) - 1, dtype=torch.bool)
        if whole
        else torch.tensor(labels[1:]) != IGNORE_INDEX
    )
    return token_logps[scored].sum()


def test_padded_batch_is_chosen_rows_then_rejected_rows(tokenizer, features) -> None:
    collator = PairCollator(pad_token_id=tokenizer.eod_id, max_length=MAX_LENGTH)
    batch = collator(features[:2])
    sequences = pair_sequences(features[:2])
    assert batch["input_ids"].shape == (4, max(len(ids) for ids, _ in sequences))
    for row, (ids, labels) in enumerate(sequences):
        length = len(ids)
        assert batch["input_ids"][row, :length].tolist() == ids
        assert set(batch["input_ids"][row, length:].tolist()) <= {tokenizer.eod_id}
        assert batch["labels"][row, :length].tolist() == [IGNORE_INDEX, *labels[1:]]
        assert set(batch["labels"][row, length:].tolist()) <= {IGNORE_INDEX}
        assert batch["attention_mask"][row].tolist() == [1] * length + [0] * (
            batch["input_ids"].shape[1] - length
        )
        assert set(batch[SEQUENCE_INDEX][row, :length].tolist()) == {row}
    pair = features[0]
    assert sequences[0][0] == pair["prompt_ids"] + pair["chosen_ids"]
    assert sequences[2][0] == pair["prompt_ids"] + pair["rejected_ids"]
    assert sequences[0][1] == [IGNORE_INDEX] * len(pair["prompt_ids"]) + pair["chosen_labels"]
    assert collator.__class__(tokenizer.eod_id, MAX_LENGTH, pad_to_max_length=True)(features[:2])[
        "input_ids"
    ].shape == (4, MAX_LENGTH)


def test_packed_batch_restarts_positions_per_sequence(tokenizer, features) -> None:
    batch = PairCollator(pad_token_id=tokenizer.eod_id, max_length=MAX_LENGTH, packing=True)(features)
    sequences = pair_sequences(features)
    assert "attention_mask" not in batch and batch["input_ids"].shape[1] <= MAX_LENGTH
    assert batch["input_ids"].shape[0] < len(sequences)  # several sequences share rows
    found = {}
    for row in range(batch["input_ids"].shape[0]):
        index = batch[SEQUENCE_INDEX][row]
        for sequence in index.unique().tolist():
            where = (index == sequence).nonzero().squeeze(1)
            if sequence < 0:  # padding: a segment of its own
                assert batch["position_ids"][row, where].tolist() == list(range(len(where)))
                continue
            assert where.tolist() == list(range(int(where[0]), int(where[-1]) + 1))
            assert batch["position_ids"][row, where].tolist() == list(range(len(where)))
            found[sequence] = batch["input_ids"][row, where].tolist()
            assert batch["labels"][row, where[0]] == IGNORE_INDEX
    assert found == {index: ids for index, (ids, _) in enumerate(sequences)}


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_pair_logps_equal_each_sequence_alone_with_full_logits(
    model, tokenizer, features, packing: bool
) -> None:
    batch = PairCollator(pad_token_id=tokenizer.eod_id, max_length=MAX_LENGTH, packing=packing)(features)
    assert int((batch["labels"] != IGNORE_INDEX).sum()) > LOSS_CHUNK_TOKENS  # several chunks
    with torch.no_grad():
        logps = pair_logps(model, batch, chosen_prompt_nll=True)
        sequences = pair_sequences(features)
        expected = torch.stack([alone(model, ids, labels) for ids, labels in sequences])
        whole = torch.stack(
            [alone(model, ids, labels, whole=True) for ids, labels in sequences[: len(features)]]
        )
    torch.testing.assert_close(torch.cat([logps.chosen, logps.rejected]), expected)
    torch.testing.assert_close(logps.chosen_sequence, whole)
    counts = [sum(label != IGNORE_INDEX for label in labels) for _, labels in sequences]
    assert torch.cat([logps.chosen_tokens, logps.rejected_tokens]).tolist() == counts
    assert logps.chosen_sequence_tokens.tolist() == [len(ids) - 1 for ids, _ in sequences[: len(features)]]


@pytest.mark.parametrize("head", ["plain", "hooked"])
def test_pair_logps_gradients_equal_those_of_full_logits(model, tokenizer, features, head: str) -> None:
    """Both ways through the lm_head give the gradients of the plain computation, lm_head and body
    alike: the fused function (a plain nn.Linear) and checkpointed chunks (here: a head with a hook)."""
    pairs = features[:3]
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25])  # a different upstream gradient per sequence
    parameters = [model.lm_head.weight, model.transformer.h[0].attn.c_attn.weight]
    batch = PairCollator(pad_token_id=tokenizer.eod_id, max_length=MAX_LENGTH, packing=True)(pairs)
    hook = (
        model.lm_head.register_forward_hook(lambda module, inputs, output: None) if head == "hooked" else None
    )
    try:
        logps = pair_logps(model, batch)
        chunked = torch.autograd.grad((torch.cat([logps.chosen, logps.rejected]) * weights).sum(), parameters)
    finally:
        if hook is not None:
            hook.remove()
    plain = torch.stack([alone(model, ids, labels) for ids, labels in pair_sequences(pairs)])
    expected = torch.autograd.grad((plain * weights).sum(), parameters)
    for got, want in zip(chunked, expected):
        torch.testing.assert_close(got, want)

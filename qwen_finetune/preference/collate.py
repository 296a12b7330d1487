"""Batches of preference pairs for one forward pass: every chosen and every rejected sequence together.

A batch of B pairs holds 2B sequences, prompt + chosen for each pair, then prompt + rejected (the
sequence numbers 0..B-1 are the chosen ones, B..2B-1 the rejected ones). Labels are -100 on the
prompts and on each sequence's first token. `SEQUENCE_INDEX` gives every token its sequence number
(-1 on padding), which is how per-sequence log-probabilities are summed (logps.py).

Default layout: one sequence per row, chosen rows then rejected rows, right-padded together to the
longest (or to model_max_length with --pad_to_max_length), with an `attention_mask`. Packed layout
(--packing): the sequences are packed into as few rows of model_max_length as fit, position ids
restart at 0 for every sequence so that each attends only to itself (see QWenModel), the padding at
the end of a row is a segment of its own, and there is no attention mask (`row_lengths` then gives
the real tokens of each row, for the token meter). Pairs that carry their PAIR_ROW number give it as
`pair_row`, one per pair, to look up values computed once per pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qwen_finetune.data.collate import ROW_LENGTHS
from qwen_finetune.data.packing import pack_lengths
from qwen_finetune.data.pairs import PAIR_ROW, pair_sequence
from qwen_model.chunked_loss import IGNORE_INDEX

SEQUENCE_INDEX = "sequence_index"


def pair_sequences(features: list[dict[str, Any]]) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) of the batch's sequences: every chosen one, then every rejected one."""
    return [
        pair_sequence(feature["prompt_ids"], feature[f"{answer}_ids"], feature[f"{answer}_labels"])
        for answer in ("chosen", "rejected")
        for feature in features
    ]


@dataclass
class PairCollator:
    pad_token_id: int
    max_length: int  # model_max_length: no sequence is longer, packed rows hold up to this many tokens
    pad_to_max_length: bool = False
    packing: bool = False

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        sequences = pair_sequences(features)
        lengths = [len(input_ids) for input_ids, _ in sequences]
        if max(lengths) > self.max_length:
            raise ValueError(
                f"a sequence has {max(lengths)} tokens, more than model_max_length {self.max_length}"
            )
        rows = (
            pack_lengths(lengths, self.max_length)
            if self.packing
            else [[index] for index in range(len(lengths))]
        )
        row_lengths = [sum(lengths[index] for index in row) for row in rows]
        width = self.max_length if self.pad_to_max_length else max(row_lengths)
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        sequence_index = torch.full(shape, -1, dtype=torch.long)
        positions = torch.zeros(shape, dtype=torch.long)
        for row, members in enumerate(rows):
            start = 0
            for index in members:
                ids, sequence_labels = sequences[index]
                end = start + len(ids)
                input_ids[row, start:end] = torch.as_tensor(ids, dtype=torch.long)
                labels[row, start:end] = torch.as_tensor(sequence_labels, dtype=torch.long)
                labels[row, start] = IGNORE_INDEX
                sequence_index[row, start:end] = index
                positions[row, start:end] = torch.arange(end - start)
                start = end
            positions[row, start:] = torch.arange(width - start)
        batch = {"input_ids": input_ids, "labels": labels, SEQUENCE_INDEX: sequence_index}
        if self.packing:
            batch["position_ids"] = positions
            batch[ROW_LENGTHS] = torch.tensor(row_lengths, dtype=torch.long)
        else:
            batch["attention_mask"] = (sequence_index >= 0).long()
        if all(PAIR_ROW in feature for feature in features):
            batch[PAIR_ROW] = torch.tensor([int(feature[PAIR_ROW]) for feature in features], dtype=torch.long)
        return batch

"""Packing: several samples per row, each keeping its own positions and attention.

A packed row concatenates samples; `position_ids` restart at 0 for every sample, which is how the
model knows where one ends (it builds a block-diagonal causal mask from them). The first label of
every sample is set to -100: the model shifts labels inside the row, so without this the last token
of one sample would be trained to predict the first token of the next. That label is never
predicted in an unpacked row either, so the loss is exactly the unpacked loss.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import datasets
import torch

from qwen_model.chunked_loss import IGNORE_INDEX


def pack_lengths(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing bin packing: sample indices grouped into rows of at most `capacity`
    tokens. Deterministic; typically within a few percent of the fewest rows possible."""
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    open_rows: list[tuple[int, int]] = []  # (free tokens, row number), sorted
    rows: list[list[int]] = []
    for index in order:
        need = int(lengths[index])
        if need > capacity:
            raise ValueError(f"sample {index} has {need} tokens, more than the row capacity {capacity}")
        position = bisect.bisect_left(open_rows, (need, -1))
        if position == len(open_rows):
            rows.append([index])
            free, row = capacity - need, len(rows) - 1
        else:
            free, row = open_rows.pop(position)
            rows[row].append(index)
            free -= need
        if free > 0:
            bisect.insort(open_rows, (free, row))
    return rows


def pack_samples(input_ids: list[list[int]], labels: list[list[int]]) -> dict[str, list[int]]:
    packed: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for sample_ids, sample_labels in zip(input_ids, labels):
        packed["input_ids"] += sample_ids
        packed["labels"] += [IGNORE_INDEX, *sample_labels[1:]]
        packed["position_ids"] += range(len(sample_ids))
    return packed


class PackedDataset(torch.utils.data.Dataset):
    """Rows of packed samples over an encoded dataset (columns input_ids, labels)."""

    def __init__(self, samples: datasets.Dataset, lengths: Sequence[int], max_length: int) -> None:
        self.samples = samples
        self.rows = pack_lengths(lengths, max_length)
        self.lengths = [sum(int(lengths[index]) for index in row) for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        batch = self.samples[self.rows[index]]
        return pack_samples(batch["input_ids"], batch["labels"])

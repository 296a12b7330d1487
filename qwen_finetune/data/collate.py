"""Batches: right padding to the longest row (default) or to model_max_length, for plain and packed rows.

Plain rows get an `attention_mask`. Packed rows (they carry `position_ids`) get none: the model
derives block-diagonal attention from the positions (flash-attention detects varlen sequences the
same way), and the padding at the end of a row is given positions 0, 1, 2, ... so that it forms a
segment of its own that no sample attends to. Packed batches instead carry `ROW_LENGTHS` (the real,
unpadded token count of each row, shape [rows]) for token accounting; it is not a model input, and
the trainer removes it before the batch reaches the model (see qwen_finetune.train.model_inputs).

In every row the first label is -100. It is never a prediction target (the model shifts labels),
so the loss does not change, but counts of supervised tokens (HF Trainer's `num_items_in_batch`)
then agree between plain and packed batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from qwen_model.chunked_loss import IGNORE_INDEX

ROW_LENGTHS = "row_lengths"


@dataclass
class SupervisedCollator:
    pad_token_id: int
    pad_to_length: int | None = None  # model_max_length with --pad_to_max_length, else None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        packed = "position_ids" in features[0]
        lengths = torch.tensor([len(feature["input_ids"]) for feature in features], dtype=torch.long)
        longest = int(lengths.max())
        width = self.pad_to_length or longest
        if longest > width:
            raise ValueError(f"a row has {longest} tokens, more than the padding length {width}")
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        extra = torch.zeros((len(features), width), dtype=torch.long)
        for row, (feature, length) in enumerate(zip(features, lengths.tolist())):
            input_ids[row, :length] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            labels[row, :length] = torch.as_tensor(feature["labels"], dtype=torch.long)
            if packed:
                extra[row, :length] = torch.as_tensor(feature["position_ids"], dtype=torch.long)
                extra[row, length:] = torch.arange(width - length)
            else:
                extra[row, :length] = 1
        labels[:, 0] = IGNORE_INDEX
        batch = {"input_ids": input_ids, "labels": labels}
        if packed:
            # one value per row (not a scalar), so that splitting a batch along rows splits it too
            batch.update(position_ids=extra, **{ROW_LENGTHS: lengths})
        else:
            batch["attention_mask"] = extra
        return batch

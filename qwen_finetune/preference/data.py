"""What a preference trainer calls: DataArguments + tokenizer + model_max_length -> pair datasets,
the one-forward-pass collator and the data report."""

from __future__ import annotations

import os

from qwen_finetune.data import DataArguments, PreparedData, encode_splits
from qwen_finetune.data.build import MainProcessFirst
from qwen_finetune.errors import ArgumentError
from qwen_finetune.tokenizer_protocol import QwenTokenizerLike

from .collate import PairCollator

PreferenceData = PreparedData[PairCollator]


def make_pair_collator(
    data_args: DataArguments, tokenizer: QwenTokenizerLike, model_max_length: int
) -> PairCollator:
    return PairCollator(
        pad_token_id=tokenizer.eod_id,
        max_length=model_max_length,
        pad_to_max_length=data_args.pad_to_max_length,
        packing=data_args.packing,
    )


def make_preference_data(
    data_args: DataArguments,
    tokenizer: QwenTokenizerLike,
    model_max_length: int,
    *,
    per_device_batch_size: int = 1,
    main_process_first: MainProcessFirst | None = None,
    output_dir: str | os.PathLike | None = None,
) -> PreferenceData:
    """Read, validate and encode (cached) the preference pairs, as `make_supervised_data` does for
    conversations. The datasets yield {id, prompt_ids, chosen_ids, chosen_labels, rejected_ids,
    rejected_labels, length}; `length` (the longer sequence of the pair) serves length grouping."""
    if data_args.lazy_preprocess:
        raise ArgumentError(
            "--lazy_preprocess cannot skip the preference pairs that do not fit (a pair is never trained on "
            "partly); drop --lazy_preprocess, pairs are encoded once and cached"
        )
    splits = encode_splits(
        data_args,
        tokenizer,
        data_args.encoding_options(model_max_length, "preference"),
        per_device_batch_size=per_device_batch_size,
        main_process_first=main_process_first,
        output_dir=output_dir,
    )
    evaluation = splits.eval.samples if splits.eval is not None else None
    collator = make_pair_collator(data_args, tokenizer, model_max_length)
    return PreferenceData(
        splits.train.samples, evaluation, collator, splits.report, splits.train.samples, evaluation
    )

"""Data pipeline: conversation or preference-pair files -> ChatML token ids + labels -> cached dataset
-> batches.

API for the trainer (all take `model_max_length` from the training arguments):

    DataArguments                                   # every data flag, for HfArgumentParser
      .encoding_options(model_max_length, kind)     # -> EncodingOptions: what decides the encoding
    make_supervised_data(data_args, tokenizer, model_max_length, *, per_device_batch_size=1,
                         main_process_first=None, output_dir=None) -> SupervisedData
        .train_dataset / .eval_dataset              # give to Trainer (eval_dataset may be None)
        .data_collator                              # give to Trainer
        .report                                     # dict, also printed and written to output_dir/data_stats.json
        .train_samples / .eval_samples              # kept samples one by one (id, input_ids, labels, length)
      main_process_first: zero-argument callable returning a context manager, e.g.
        `lambda: training_args.main_process_first(local=True)`; default: torch.distributed barrier.
    encode_splits(data_args, tokenizer, options, ...) -> EncodedSplits
        # read, encode (cached), split and report either kind; preference data is built on it
        # (qwen_finetune.preference.make_preference_data)
    make_data_collator(data_args, tokenizer, model_max_length) -> SupervisedCollator
    run_check_data(data_args, tokenizer, model_max_length, output_dir, *, per_device_batch_size=1,
                   kind="supervised") -> int
        # --check_data: validate, print the report, write --dump_encoded; returns the exit code
    DataError                                       # bad data; the message says file, sample, field and fix

Module map: formats / pair_formats (read + normalise conversations / preference pairs) -> turns /
react (ChatML turns, tool use in ReAct) -> chatml / pairs (ids + labels, truncation) -> dataset
(datasets.map, disk cache, lazy mode) -> packing / collate (rows and batches of conversations) ->
report (data_stats.json) -> build (the API above) -> inspect (--check_data). Formats, encoding and
the tool rendering are documented in docs/data_formats.md.
"""

from .args import DataArguments, EncodingOptions
from .build import (
    EncodedSplits,
    PreparedData,
    SupervisedData,
    encode_splits,
    make_data_collator,
    make_supervised_data,
)
from .chatml import IGNORE_INDEX, ChatMLEncoder
from .collate import SupervisedCollator
from .errors import DataError
from .formats import DATA_FORMATS
from .inspect import run_check_data

__all__ = [
    "DATA_FORMATS",
    "IGNORE_INDEX",
    "ChatMLEncoder",
    "DataArguments",
    "DataError",
    "EncodedSplits",
    "EncodingOptions",
    "PreparedData",
    "SupervisedCollator",
    "SupervisedData",
    "encode_splits",
    "make_data_collator",
    "make_supervised_data",
    "run_check_data",
]

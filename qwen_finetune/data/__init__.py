"""Data pipeline: conversation files -> ChatML token ids + labels -> cached dataset -> batches.

API for the trainer (all take `model_max_length` from the training arguments):

    DataArguments                                   # every data flag, for HfArgumentParser
    make_supervised_data(data_args, tokenizer, model_max_length, *, per_device_batch_size=1,
                         main_process_first=None, output_dir=None) -> SupervisedData
        .train_dataset / .eval_dataset              # give to Trainer (eval_dataset may be None)
        .data_collator                              # give to Trainer
        .report                                     # dict, also printed and written to output_dir/data_stats.json
        .train_samples / .eval_samples              # kept samples one by one (id, input_ids, labels, length)
      main_process_first: zero-argument callable returning a context manager, e.g.
        `lambda: training_args.main_process_first(local=True)`; default: torch.distributed barrier.
    make_data_collator(data_args, tokenizer, model_max_length) -> SupervisedCollator
    run_check_data(data_args, tokenizer, model_max_length, output_dir, *, per_device_batch_size=1) -> int
        # --check_data: validate, print the report, write --dump_encoded; returns the exit code
    DataError                                       # bad data; the message says file, sample, field and fix

Module map: formats (read + normalise the four formats) -> turns / react (ChatML turns, tool use in
ReAct) -> chatml (ids + labels, truncation) -> dataset (datasets.map, disk cache, lazy mode) ->
packing / collate (rows and batches) -> report (data_stats.json) -> build (the API above) ->
inspect (--check_data). Formats and the tool rendering are documented in docs/data_formats.md.
"""

from .args import DataArguments
from .build import SupervisedData, make_data_collator, make_supervised_data
from .chatml import IGNORE_INDEX, ChatMLEncoder
from .collate import SupervisedCollator
from .errors import DataError
from .inspect import run_check_data

__all__ = [
    "IGNORE_INDEX",
    "ChatMLEncoder",
    "DataArguments",
    "DataError",
    "SupervisedCollator",
    "SupervisedData",
    "make_data_collator",
    "make_supervised_data",
    "run_check_data",
]

"""What the trainer calls: DataArguments + tokenizer + model_max_length -> datasets, collator, report.

`encode_splits` is shared by conversations and preference pairs: it reads and encodes the files
(cached), holds out the eval set and reports; `make_supervised_data` adds packing and the collator of
supervised fine-tuning (qwen_finetune.preference builds preference data on `encode_splits` too).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import datasets
import numpy as np
import pyarrow.compute as pc
import torch

from qwen_finetune.tokenizer_protocol import QwenTokenizerLike

from .args import DataArguments, DataKind, EncodingOptions
from .chatml import ChatMLEncoder
from .collate import SupervisedCollator
from .dataset import ENCODERS, EncodedFiles, FileSummary, LazySupervisedDataset, encode_files, read_files
from .errors import DataError
from .packing import PackedDataset
from .pairs import PAIR_ROW
from .report import SplitColumns, batching_mode, files_section, format_report, split_report, write_report

logger = logging.getLogger(__name__)

EVAL_SPLIT_SEED = 0
MainProcessFirst = Callable[[], contextlib.AbstractContextManager[Any]]

Collator = TypeVar("Collator")
Table = TypeVar("Table")


@dataclass
class PreparedData(Generic[Collator]):
    """`train_dataset` / `eval_dataset` are what the Trainer iterates (packed rows with --packing for
    conversations); `train_samples` / `eval_samples` are the kept samples one by one (conversations:
    columns id, input_ids, labels, length; pairs: see pairs.PairEncoder), e.g. for dumping. `report`
    is the content of data_stats.json."""

    train_dataset: torch.utils.data.Dataset
    eval_dataset: torch.utils.data.Dataset | None
    data_collator: Collator
    report: dict[str, Any]
    train_samples: torch.utils.data.Dataset
    eval_samples: torch.utils.data.Dataset | None


SupervisedData = PreparedData[SupervisedCollator]


@dataclass
class EncodedSplit:
    """The kept samples of one split, with the encoder's columns (stats removed) and their lengths."""

    samples: datasets.Dataset
    lengths: np.ndarray


@dataclass
class EncodedSplits:
    train: EncodedSplit
    eval: EncodedSplit | None
    report: dict[str, Any]


def make_data_collator(
    data_args: DataArguments, tokenizer: QwenTokenizerLike, model_max_length: int
) -> SupervisedCollator:
    return SupervisedCollator(
        pad_token_id=tokenizer.eod_id,
        pad_to_length=model_max_length if data_args.pad_to_max_length else None,
    )


def is_main_process() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


# ------------------------------------------------------------------------------------------ eval split


@dataclass
class _Source(Generic[Table]):
    """The rows of one read or encoded set of files that make up a split."""

    table: Table
    rows: np.ndarray
    files: list[str]


def _eval_split(count: int, ratio: float, files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, eval rows), each in file order; the same split on every run and rank."""
    eval_count = max(1, round(count * ratio))
    if count - eval_count < 1:
        raise DataError(
            f"--eval_split_ratio {ratio} leaves no training sample out of {count}",
            fix="lower --eval_split_ratio or add samples",
            file=", ".join(files),
        )
    order = np.random.default_rng(EVAL_SPLIT_SEED).permutation(count)
    return np.sort(order[eval_count:]), np.sort(order[:eval_count])


def _split_sources(
    data_args: DataArguments, load: Callable[[list[str]], Table], count: Callable[[Table], int]
) -> dict[str, _Source[Table]]:
    """The one place the eval set is decided: --eval_split_ratio holds out samples of the training
    files (a fixed, seed-independent choice), --eval_data_path loads other files."""
    if not data_args.train_files:
        raise DataError("no training data given", fix="pass --data_path FILE[,FILE...] (.json or .jsonl)")
    train = load(data_args.train_files)
    total = count(train)
    if data_args.eval_split_ratio > 0:
        train_rows, eval_rows = _eval_split(total, data_args.eval_split_ratio, data_args.train_files)
        return {
            "train": _Source(train, train_rows, data_args.train_files),
            "eval": _Source(train, eval_rows, data_args.train_files),
        }
    sources = {"train": _Source(train, np.arange(total), data_args.train_files)}
    if data_args.eval_files:
        evaluation = load(data_args.eval_files)
        sources["eval"] = _Source(evaluation, np.arange(count(evaluation)), data_args.eval_files)
    return sources


def _file_summaries(
    sources: dict[str, _Source[Any]], files_of: Callable[[Any], list[FileSummary]]
) -> list[Any]:
    """Each file once, also when the eval set is held out of the training files."""
    tables = {id(source.table): source.table for source in sources.values()}
    return files_section([summary for table in tables.values() for summary in files_of(table)])


# ---------------------------------------------------------------------------------------------- report


def _settings(data_args: DataArguments, options: EncodingOptions) -> dict[str, Any]:
    return {
        "kind": options.kind,
        "model_max_length": options.max_length,
        "data_format": options.data_format,
        "system_message": options.system_message,
        "label_policy": options.label_policy,
        "truncation": options.truncation,
        "allow_special_tokens_in_data": options.allow_special,
        "batching": batching_mode(data_args.packing, data_args.pad_to_max_length),
        "lazy_preprocess": data_args.lazy_preprocess,
        "data_cache_dir": None if data_args.lazy_preprocess else str(data_args.resolved_cache_dir),
    }


def _columns(encoded: datasets.Dataset, kind: DataKind) -> SplitColumns:
    table = encoded.data
    lengths = table.column("length").to_numpy()
    if kind == "preference":
        prompt, chosen, rejected = (
            pc.list_value_length(table.column(name)).to_numpy().astype(np.int64)
            for name in ("prompt_ids", "chosen_ids", "rejected_ids")
        )
        token_counts = {
            "total_tokens": 2 * prompt + chosen + rejected,
            "prompt_tokens": prompt,
            "chosen_tokens": chosen,
            "rejected_tokens": rejected,
        }
    else:
        token_counts = {
            "total_tokens": lengths,
            "supervised_tokens": table.column("num_supervised").to_numpy(),
        }
    return SplitColumns(
        ids=table.column("id").to_pylist(),
        lengths=lengths,
        truncated=table.column("truncated").to_numpy(zero_copy_only=False),
        skip_reasons=table.column("skip_reason").to_pylist(),
        token_counts=token_counts,
    )


def _numbered(encoded: datasets.Dataset, kind: DataKind) -> datasets.Dataset:
    """Pairs get their row number (PAIR_ROW); added before any selection, so no row is copied."""
    if kind != "preference":
        return encoded
    return encoded.add_column(PAIR_ROW, np.arange(len(encoded), dtype=np.int64))


def _nothing_kept(split: str, stats: dict[str, Any], files: list[str]) -> DataError:
    reasons = ", ".join(f"{reason}: {detail['count']}" for reason, detail in stats["skipped"].items())
    return DataError(
        f"no {split} sample is left: all {stats['samples_read']} were skipped ({reasons})",
        fix="raise --model_max_length, or use --truncation cut, or shorten the samples",
        file=", ".join(files),
    )


def _publish(report: dict[str, Any], output_dir: str | os.PathLike | None) -> None:
    if not is_main_process():
        return
    print(format_report(report), flush=True)
    if output_dir is not None:
        path = write_report(report, output_dir)
        logger.info("data report written to %s", path)


# ------------------------------------------------------------------------------------------ encoding


def encode_splits(
    data_args: DataArguments,
    tokenizer: QwenTokenizerLike,
    options: EncodingOptions,
    *,
    per_device_batch_size: int = 1,
    main_process_first: MainProcessFirst | None = None,
    output_dir: str | os.PathLike | None = None,
) -> EncodedSplits:
    """Read, validate and encode (cached) the training and evaluation files as `options.kind`, keep
    the samples that fit, and publish the report (printed by the main process, written to
    `output_dir`/data_stats.json). Raises DataError on bad data or when no sample is left."""

    def encode(paths: list[str]) -> EncodedFiles:
        return encode_files(
            paths,
            tokenizer,
            options,
            num_workers=data_args.preprocessing_num_workers,
            cache_dir=data_args.resolved_cache_dir,
            main_process_first=main_process_first,
        )

    sources = _split_sources(data_args, encode, lambda encoded: len(encoded.dataset))
    report: dict[str, Any] = {"settings": _settings(data_args, options)}
    report["settings"]["from_cache"] = sources["train"].table.from_cache
    columns_of = {
        id(source.table): _columns(source.table.dataset, options.kind) for source in sources.values()
    }
    tables = {id(source.table): _numbered(source.table.dataset, options.kind) for source in sources.values()}
    splits: dict[str, EncodedSplit] = {}
    for split, source in sources.items():
        columns = columns_of[id(source.table)].take(source.rows)
        stats = split_report(
            columns,
            batch_size=per_device_batch_size,
            max_length=options.max_length,
            pad_to_max_length=data_args.pad_to_max_length,
            padding_stats=options.kind == "supervised",
        )
        if stats["samples_kept"] == 0:
            raise _nothing_kept(split, stats, source.files)
        kept = columns.kept_mask()
        samples = (
            tables[id(source.table)]
            .select(source.rows[kept])
            .remove_columns(list(ENCODERS[options.kind].stat_columns))
        )
        splits[split] = EncodedSplit(samples, columns.lengths[kept])
        report[split] = stats
    report["files"] = _file_summaries(sources, lambda encoded: encoded.files)
    _publish(report, output_dir)
    return EncodedSplits(splits["train"], splits.get("eval"), report)


def _lazy_data(
    data_args: DataArguments, tokenizer: QwenTokenizerLike, options: EncodingOptions, batch_size: int
) -> tuple[LazySupervisedDataset, LazySupervisedDataset | None, dict[str, Any]]:
    """Files are read and validated now; encoding happens when a sample is used."""
    sources = _split_sources(
        data_args, lambda paths: read_files(paths, options), lambda read: len(read.samples)
    )
    encoder = ChatMLEncoder(tokenizer, options)
    report: dict[str, Any] = {"settings": _settings(data_args, options)}
    lazy: dict[str, LazySupervisedDataset] = {}
    for split, source in sources.items():
        samples = [source.table.samples[row] for row in source.rows]
        columns = SplitColumns(
            ids=[sample_id for sample_id, _ in samples],
            lengths=np.zeros(len(samples), dtype=np.int64),
            truncated=np.zeros(len(samples), dtype=bool),
            skip_reasons=[""] * len(samples),
            token_counts={},
        )
        report[split] = split_report(
            columns,
            batch_size=batch_size,
            max_length=options.max_length,
            pad_to_max_length=False,
            token_stats=False,
        )
        report[split]["note"] = "lazy_preprocess: samples are encoded when used, so no token statistics"
        lazy[split] = LazySupervisedDataset(samples, encoder)
    report["files"] = _file_summaries(sources, lambda read: read.files)
    return lazy["train"], lazy.get("eval"), report


def make_supervised_data(
    data_args: DataArguments,
    tokenizer: QwenTokenizerLike,
    model_max_length: int,
    *,
    per_device_batch_size: int = 1,
    main_process_first: MainProcessFirst | None = None,
    output_dir: str | os.PathLike | None = None,
) -> SupervisedData:
    """Read, validate, encode (cached) and batch the training and evaluation conversations.

    `main_process_first`: makes a context manager under which the main process of each node encodes
    first while the others wait, e.g. `lambda: training_args.main_process_first(local=True)`; by
    default a torch.distributed barrier is used when it is initialised. Raises DataError on bad data.
    The report is printed by the main process and written to `output_dir`/data_stats.json.
    """
    options = data_args.encoding_options(model_max_length)
    collator = make_data_collator(data_args, tokenizer, model_max_length)
    if data_args.lazy_preprocess:
        train, evaluation, report = _lazy_data(data_args, tokenizer, options, per_device_batch_size)
        _publish(report, output_dir)
        return SupervisedData(train, evaluation, collator, report, train, evaluation)

    splits = encode_splits(
        data_args,
        tokenizer,
        options,
        per_device_batch_size=per_device_batch_size,
        main_process_first=main_process_first,
        output_dir=output_dir,
    )

    def trainer_dataset(split: EncodedSplit) -> torch.utils.data.Dataset:
        if data_args.packing:
            return PackedDataset(split.samples, split.lengths.tolist(), model_max_length)
        return split.samples

    held_out = splits.eval
    return SupervisedData(
        trainer_dataset(splits.train),
        trainer_dataset(held_out) if held_out is not None else None,
        collator,
        splits.report,
        splits.train.samples,
        held_out.samples if held_out is not None else None,
    )

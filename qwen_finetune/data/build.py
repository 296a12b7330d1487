"""What the trainer calls: DataArguments + tokenizer + model_max_length -> datasets, collator, report."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import torch

from .args import DataArguments
from .chatml import ChatMLEncoder
from .collate import SupervisedCollator
from .dataset import (
    STAT_COLUMNS,
    EncodedFiles,
    LazySupervisedDataset,
    encode_files,
    load_files,
    samples_as_turns,
    summarise_files,
)
from .errors import DataError
from .packing import PackedDataset
from .report import SplitColumns, batching_mode, files_section, format_report, split_report, write_report

logger = logging.getLogger(__name__)

EVAL_SPLIT_SEED = 0


@dataclass
class SupervisedData:
    """`train_dataset` / `eval_dataset` are what the Trainer iterates (packed rows with --packing);
    `train_samples` / `eval_samples` are the kept samples one by one (columns id, input_ids, labels,
    length), e.g. for dumping. `report` is the content of data_stats.json."""

    train_dataset: torch.utils.data.Dataset
    eval_dataset: torch.utils.data.Dataset | None
    data_collator: SupervisedCollator
    report: dict[str, Any]
    train_samples: torch.utils.data.Dataset
    eval_samples: torch.utils.data.Dataset | None


def make_data_collator(data_args: DataArguments, tokenizer: Any, model_max_length: int) -> SupervisedCollator:
    return SupervisedCollator(
        pad_token_id=tokenizer.eod_id,
        pad_to_length=model_max_length if data_args.pad_to_max_length else None,
    )


def is_main_process() -> bool:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


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


def _columns(encoded: datasets.Dataset) -> SplitColumns:
    table = encoded.data
    return SplitColumns(
        ids=table.column("id").to_pylist(),
        lengths=table.column("length").to_numpy(),
        num_supervised=table.column("num_supervised").to_numpy(),
        truncated=table.column("truncated").to_numpy(zero_copy_only=False),
        skip_reasons=table.column("skip_reason").to_pylist(),
    )


def _take(columns: SplitColumns, rows: np.ndarray) -> SplitColumns:
    return SplitColumns(
        ids=[columns.ids[row] for row in rows],
        lengths=columns.lengths[rows],
        num_supervised=columns.num_supervised[rows],
        truncated=columns.truncated[rows],
        skip_reasons=[columns.skip_reasons[row] for row in rows],
    )


def _nothing_kept(split: str, stats: dict[str, Any], files: list[str]) -> DataError:
    reasons = ", ".join(f"{reason}: {detail['count']}" for reason, detail in stats["skipped"].items())
    return DataError(
        f"no {split} sample is left: all {stats['samples_read']} were skipped ({reasons})",
        fix="raise --model_max_length, or use --truncation cut, or shorten the samples",
        file=", ".join(files),
    )


class _SplitBuilder:
    """Turns encoded rows of one split into the kept-sample dataset, the trainer dataset and stats."""

    def __init__(self, data_args: DataArguments, model_max_length: int, batch_size: int) -> None:
        self.data_args = data_args
        self.model_max_length = model_max_length
        self.batch_size = batch_size

    def build(
        self, encoded: datasets.Dataset, columns: SplitColumns, rows: np.ndarray, split: str, files: list[str]
    ) -> tuple[torch.utils.data.Dataset, datasets.Dataset, dict[str, Any]]:
        split_columns = _take(columns, rows)
        stats = split_report(
            split_columns,
            batch_size=self.batch_size,
            max_length=self.model_max_length,
            pad_to_max_length=self.data_args.pad_to_max_length,
        )
        if stats["samples_kept"] == 0:
            raise _nothing_kept(split, stats, files)
        kept_rows = rows[split_columns.kept_mask()]
        samples = encoded.select(kept_rows).remove_columns(STAT_COLUMNS)
        if not self.data_args.packing:
            return samples, samples, stats
        packed = PackedDataset(samples, columns.lengths[kept_rows], self.model_max_length)
        return packed, samples, stats


def _encode(
    paths: list[str],
    data_args: DataArguments,
    tokenizer: Any,
    model_max_length: int,
    main_process_first: Callable[[], contextlib.AbstractContextManager[Any]] | None,
) -> EncodedFiles:
    return encode_files(
        paths,
        tokenizer=tokenizer,
        max_length=model_max_length,
        data_format=data_args.data_format,
        system_message=data_args.system_message,
        label_policy=data_args.label_policy,
        truncation=data_args.truncation,
        allow_special=data_args.allow_special_tokens_in_data,
        num_workers=data_args.preprocessing_num_workers,
        cache_dir=data_args.resolved_cache_dir,
        main_process_first=main_process_first,
    )


def _settings(data_args: DataArguments, model_max_length: int) -> dict[str, Any]:
    return {
        "model_max_length": model_max_length,
        "data_format": data_args.data_format,
        "system_message": data_args.system_message,
        "label_policy": data_args.label_policy,
        "truncation": data_args.truncation,
        "allow_special_tokens_in_data": data_args.allow_special_tokens_in_data,
        "batching": batching_mode(data_args.packing, data_args.pad_to_max_length),
        "lazy_preprocess": data_args.lazy_preprocess,
        "data_cache_dir": None if data_args.lazy_preprocess else str(data_args.resolved_cache_dir),
    }


def _publish(report: dict[str, Any], output_dir: str | os.PathLike | None) -> None:
    if not is_main_process():
        return
    print(format_report(report), flush=True)
    if output_dir is not None:
        path = write_report(report, output_dir)
        logger.info("data report written to %s", path)


def _lazy_data(
    data_args: DataArguments, tokenizer: Any, model_max_length: int, batch_size: int
) -> tuple[LazySupervisedDataset, LazySupervisedDataset | None, dict[str, Any]]:
    """Files are read and validated now; encoding happens when a sample is used."""
    encoder = ChatMLEncoder(
        tokenizer,
        max_length=model_max_length,
        label_policy=data_args.label_policy,
        truncation=data_args.truncation,
        allow_special=data_args.allow_special_tokens_in_data,
    )
    report: dict[str, Any] = {"files": []}
    splits: dict[str, list[Any]] = {}
    for split, paths in (("train", data_args.train_files), ("eval", data_args.eval_files)):
        if paths:
            loaded = load_files(paths, data_args.data_format)
            report["files"] += files_section(summarise_files(loaded))
            splits[split] = samples_as_turns(loaded, data_args.system_message)
    if data_args.eval_split_ratio > 0:
        train_rows, eval_rows = _eval_split(
            len(splits["train"]), data_args.eval_split_ratio, data_args.train_files
        )
        samples = splits["train"]
        splits["train"], splits["eval"] = [samples[i] for i in train_rows], [samples[i] for i in eval_rows]
    for split, samples in splits.items():
        columns = SplitColumns(
            ids=[sample_id for sample_id, _ in samples],
            lengths=np.zeros(len(samples), dtype=np.int64),
            num_supervised=np.zeros(len(samples), dtype=np.int64),
            truncated=np.zeros(len(samples), dtype=bool),
            skip_reasons=[""] * len(samples),
        )
        report[split] = split_report(
            columns,
            batch_size=batch_size,
            max_length=model_max_length,
            pad_to_max_length=False,
            token_stats=False,
        )
        report[split]["note"] = "lazy_preprocess: samples are encoded when used, so no token statistics"
    train = LazySupervisedDataset(splits["train"], encoder)
    evaluation = LazySupervisedDataset(splits["eval"], encoder) if "eval" in splits else None
    return train, evaluation, report


def make_supervised_data(
    data_args: DataArguments,
    tokenizer: Any,
    model_max_length: int,
    *,
    per_device_batch_size: int = 1,
    main_process_first: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    output_dir: str | os.PathLike | None = None,
) -> SupervisedData:
    """Read, validate, encode (cached) and batch the training and evaluation data.

    `main_process_first`: makes a context manager under which the main process of each node encodes
    first while the others wait, e.g. `lambda: training_args.main_process_first(local=True)`; by
    default a torch.distributed barrier is used when it is initialised. Raises DataError on bad data.
    The report is printed by the main process and written to `output_dir`/data_stats.json.
    """
    if not data_args.train_files:
        raise DataError("no training data given", fix="pass --data_path FILE[,FILE...] (.json or .jsonl)")
    collator = make_data_collator(data_args, tokenizer, model_max_length)
    if data_args.lazy_preprocess:
        train, evaluation, report = _lazy_data(data_args, tokenizer, model_max_length, per_device_batch_size)
        report = {"settings": _settings(data_args, model_max_length), **report}
        _publish(report, output_dir)
        return SupervisedData(train, evaluation, collator, report, train, evaluation)

    builder = _SplitBuilder(data_args, model_max_length, per_device_batch_size)
    encoded = _encode(data_args.train_files, data_args, tokenizer, model_max_length, main_process_first)
    columns = _columns(encoded.dataset)
    all_rows = np.arange(len(columns.ids))
    file_summaries = list(encoded.files)
    report: dict[str, Any] = {"settings": _settings(data_args, model_max_length)}
    report["settings"]["from_cache"] = encoded.from_cache

    eval_parts = None
    if data_args.eval_split_ratio > 0:
        train_rows, eval_rows = _eval_split(len(all_rows), data_args.eval_split_ratio, data_args.train_files)
        eval_parts = (encoded.dataset, columns, eval_rows, data_args.train_files)
    else:
        train_rows = all_rows
        if data_args.eval_files:
            eval_encoded = _encode(
                data_args.eval_files, data_args, tokenizer, model_max_length, main_process_first
            )
            eval_columns = _columns(eval_encoded.dataset)
            file_summaries += eval_encoded.files
            eval_parts = (
                eval_encoded.dataset,
                eval_columns,
                np.arange(len(eval_columns.ids)),
                data_args.eval_files,
            )

    train, train_samples, report["train"] = builder.build(
        encoded.dataset, columns, train_rows, "train", data_args.train_files
    )
    evaluation = eval_samples = None
    if eval_parts is not None:
        eval_dataset, eval_columns, eval_rows, eval_files = eval_parts
        evaluation, eval_samples, report["eval"] = builder.build(
            eval_dataset, eval_columns, eval_rows, "eval", eval_files
        )
    report["files"] = files_section(file_summaries)
    _publish(report, output_dir)
    return SupervisedData(train, evaluation, collator, report, train_samples, eval_samples)

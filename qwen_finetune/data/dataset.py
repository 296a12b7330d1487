"""Tokenise once, in parallel, and cache on disk; or encode lazily, sample by sample.

Conversations (chatml.py) and preference pairs (pairs.py) take the same path: files -> turns ->
one row per sample from the kind's encoder. The cache entry for a list of files is keyed by the
files' bytes, the tokenizer's vocabulary and the encoding options, so a stale entry can never be used. One process per node
(local rank 0) writes it while the others wait, then everybody memory-maps the same files. Entries
are written to a temporary directory and renamed, so a crash never leaves half an entry behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import multiprocess
import torch

from qwen_finetune.tokenizer_protocol import QwenTokenizerLike
from qwen_model.chunked_loss import IGNORE_INDEX

from .args import DataKind, EncodingOptions
from .chatml import ChatMLEncoder
from .formats import load_file
from .pair_formats import load_pair_file
from .pairs import PairEncoder
from .turns import Turn, conversation_to_turns, pair_to_turns

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = "qwen_finetune.data/3"


# The encoder of each kind of data: its `features` are the dataset columns, `encode_row` makes one
# row per sample, and its `stat_columns` are read by the data report only.
RowEncoder = ChatMLEncoder | PairEncoder
ENCODERS: dict[DataKind, type[ChatMLEncoder] | type[PairEncoder]] = {
    "supervised": ChatMLEncoder,
    "preference": PairEncoder,
}


@dataclass
class FileSummary:
    path: str
    format: str
    samples: int
    leading_turns_dropped: int


@dataclass
class EncodedFiles:
    """Every sample of some files, encoded, skipped ones included (with empty ids and a reason)."""

    dataset: datasets.Dataset
    files: list[FileSummary]
    from_cache: bool


# ------------------------------------------------------------------------------------- fingerprints


def _sha256_of_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer: QwenTokenizerLike) -> str:
    """Vocabulary files (when the tokenizer names them), special ids and a probe encoding."""
    parts: dict[str, Any] = {
        "class": type(tokenizer).__name__,
        "size": len(tokenizer),
        "special": [tokenizer.im_start_id, tokenizer.im_end_id, tokenizer.eod_id],
        "probe": tokenizer.encode_text("Qwen 通义千问 <|im_end|> 12345\n\n", allow_special=True),
    }
    for attribute in ("vocab_file", "extra_vocab_file"):
        path = getattr(tokenizer, attribute, None)
        if path and Path(path).is_file():
            parts[attribute] = _sha256_of_file(path)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_key(files: list[str], tokenizer: QwenTokenizerLike, options: dict[str, Any]) -> str:
    """Hex key over the files' contents (not their names or dates), the tokenizer and the options."""
    parts = {
        "version": CACHE_FORMAT_VERSION,
        "files": [_sha256_of_file(path) if Path(path).is_file() else f"missing:{path}" for path in files],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "options": options,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


# -------------------------------------------------------------------------------------------- loading


@dataclass
class ReadFiles:
    """Every sample of some files as (id, turns), validated, with a summary per file."""

    samples: list[tuple[str, list[Turn]]]
    files: list[FileSummary]


def read_files(paths: list[str], options: EncodingOptions) -> ReadFiles:
    """Read and validate the files as the options' kind (conversations or preference pairs)."""
    samples: list[tuple[str, list[Turn]]] = []
    files = []
    for path in paths:
        if options.kind == "preference":
            pair_file = load_pair_file(path, options.data_format)
            samples += [(pair.id, pair_to_turns(pair, options.system_message)) for pair in pair_file.pairs]
            files.append(
                FileSummary(path, pair_file.format, len(pair_file.pairs), pair_file.leading_turns_dropped)
            )
        else:
            loaded = load_file(path, options.data_format)
            samples += [
                (conversation.id, conversation_to_turns(conversation, options.system_message))
                for conversation in loaded.conversations
            ]
            files.append(
                FileSummary(path, loaded.format, len(loaded.conversations), loaded.leading_turns_dropped)
            )
    return ReadFiles(samples, files)


def _turns_table(samples: list[tuple[str, list[Turn]]]) -> dict[str, list[Any]]:
    return {
        "id": [sample_id for sample_id, _ in samples],
        "roles": [[turn.role for turn in turns] for _, turns in samples],
        "texts": [[[text for text, _ in turn.pieces] for turn in turns] for _, turns in samples],
        "trained": [[[trained for _, trained in turn.pieces] for turn in turns] for _, turns in samples],
    }


# Encoders that forked `datasets.map` workers find by key (set before the pool forks), so that the
# tokenizer is not pickled and rebuilt in every worker (about half a second each).
_ENCODERS_FOR_FORKED_WORKERS: dict[int, RowEncoder] = {}


class _EncodeBatch:
    """The `datasets.map` function: turns columns in, the encoder's columns out."""

    def __init__(self, encoder: RowEncoder, by_reference: bool = False) -> None:
        self.encoder = encoder
        self.by_reference = by_reference

    def __getstate__(self) -> dict[str, Any]:
        if self.by_reference:
            return {"encoder_key": id(self.encoder)}
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "encoder_key" in state:
            state = {"encoder": _ENCODERS_FOR_FORKED_WORKERS[state["encoder_key"]], "by_reference": True}
        self.__dict__.update(state)

    def __call__(self, batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {name: [] for name in self.encoder.features}
        for roles, texts, trained in zip(batch["roles"], batch["texts"], batch["trained"]):
            turns = [
                Turn(role, tuple(zip(turn_texts, turn_trained)))
                for role, turn_texts, turn_trained in zip(roles, texts, trained)
            ]
            for name, value in self.encoder.encode_row(turns).items():
                out[name].append(value)
        return out


def encode_samples(
    samples: list[tuple[str, list[Turn]]], encoder: RowEncoder, num_workers: int | None, fingerprint: str
) -> datasets.Dataset:
    """All samples, skipped ones included. `fingerprint` names the result for `datasets` (our own key,
    so that `datasets` does not hash the tokenizer to make one)."""
    table = datasets.Dataset.from_dict(_turns_table(samples))
    workers = num_workers if num_workers and num_workers > 1 and len(samples) > 1 else None
    by_reference = workers is not None and multiprocess.get_start_method() == "fork"
    if by_reference:
        _ENCODERS_FOR_FORKED_WORKERS[id(encoder)] = encoder
    try:
        return table.map(
            _EncodeBatch(encoder, by_reference),
            batched=True,
            batch_size=256,
            num_proc=workers,
            remove_columns=["roles", "texts", "trained"],
            features=datasets.Features({"id": datasets.Value("string"), **encoder.features}),
            new_fingerprint=fingerprint,
            desc="Tokenizing",
        )
    finally:
        _ENCODERS_FOR_FORKED_WORKERS.pop(id(encoder), None)


# ---------------------------------------------------------------------------------------------- cache


def _entry_complete(entry: Path) -> bool:
    return (entry / "meta.json").is_file()


def _load_entry(entry: Path) -> EncodedFiles:
    meta = json.loads((entry / "meta.json").read_text())
    dataset = datasets.load_from_disk(str(entry / "dataset"))
    return EncodedFiles(dataset, [FileSummary(**item) for item in meta["files"]], from_cache=True)


@contextlib.contextmanager
def _without_progress_bars() -> Iterator[None]:
    """Saving a few MB needs no progress bar in the start-up output."""
    were_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not were_disabled:
            datasets.enable_progress_bars()


def _save_entry(entry: Path, encoded: EncodedFiles) -> None:
    """Write next to the final place, then rename: readers see a whole entry or none."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}-", dir=entry.parent))
    except OSError as error:
        logger.warning(
            "data cache %s is not writable (%s); the tokenised data is kept in memory", entry, error
        )
        return
    try:
        with _without_progress_bars():
            encoded.dataset.save_to_disk(str(staging / "dataset"))
        meta = {"version": CACHE_FORMAT_VERSION, "files": [asdict(item) for item in encoded.files]}
        (staging / "meta.json").write_text(json.dumps(meta, indent=1))
        os.rename(staging, entry)
    except OSError as error:
        if not _entry_complete(entry):
            logger.warning("could not write the data cache entry %s: %s", entry, error)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def local_main_process_first() -> Iterator[None]:
    """Without the trainer's helper: when torch.distributed is running, local rank 0 of each node
    goes first (the cache is on local disk) and the others wait at a barrier, then read."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        yield
        return
    is_local_main = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if not is_local_main:
        torch.distributed.barrier()
    try:
        yield
    finally:
        if is_local_main:
            torch.distributed.barrier()


def encode_files(
    paths: list[str],
    tokenizer: QwenTokenizerLike,
    options: EncodingOptions,
    *,
    num_workers: int | None,
    cache_dir: Path | None,
    main_process_first: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
) -> EncodedFiles:
    """Encode `paths` (all samples, with stats), from the cache when possible.

    `main_process_first` makes a context manager (e.g. `lambda: training_args.main_process_first(local=True)`)
    under which the main process goes first; default: `local_main_process_first`. Every rank that
    finds no cache entry reads and validates the files itself before waiting for
    the main process, so a data error stops all ranks with the same message instead of leaving
    them waiting at a barrier.
    """
    key = cache_key(paths, tokenizer, asdict(options))
    entry = cache_dir / key if cache_dir is not None else None
    read = None if entry is not None and _entry_complete(entry) else read_files(paths, options)
    with (main_process_first or local_main_process_first)():
        if entry is not None and _entry_complete(entry):
            return _load_entry(entry)
        read = read or read_files(paths, options)
        dataset = encode_samples(read.samples, ENCODERS[options.kind](tokenizer, options), num_workers, key)
        encoded = EncodedFiles(dataset, read.files, from_cache=False)
        if entry is not None:
            _save_entry(entry, encoded)
            if _entry_complete(entry):  # memory-mapped from disk rather than held in memory
                return EncodedFiles(_load_entry(entry).dataset, encoded.files, from_cache=False)
        return encoded


# -------------------------------------------------------------------------------------- lazy encoding


class LazySupervisedDataset(torch.utils.data.Dataset):
    """Encodes each sample when it is read (--lazy_preprocess). Files are still read and validated
    up front. A sample with nothing left to learn cannot be skipped here (the length of the dataset
    is fixed): it is returned with every label -100, and a warning names it."""

    def __init__(self, samples: list[tuple[str, list[Turn]]], encoder: ChatMLEncoder) -> None:
        self.samples = samples
        self.encoder = encoder
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample_id, turns = self.samples[index]
        sample = self.encoder.encode(turns)
        labels = sample.labels
        if sample.skip_reason:
            labels = [IGNORE_INDEX] * len(labels)
            if sample_id not in self._warned:
                self._warned.add(sample_id)
                logger.warning(
                    "sample %s has nothing to learn (%s); its labels are all -100",
                    sample_id,
                    sample.skip_reason,
                )
        return {"id": sample_id, "input_ids": sample.input_ids, "labels": labels}

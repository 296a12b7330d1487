"""`--check_data`: validate and encode the data, print the report, optionally dump the encoding,
and return an exit code, all without loading a model."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from qwen_finetune.tokenizer_protocol import QwenTokenizerLike

from .args import DataArguments, DataKind
from .build import encode_splits
from .errors import DataError
from .pairs import pair_sequence


def dump_record(kind: DataKind, row: dict[str, Any]) -> dict[str, Any]:
    """A conversation as {id, input_ids, labels}; a pair as its two full sequences,
    {id, chosen_input_ids, chosen_labels, rejected_input_ids, rejected_labels} (-100 on the prompt)."""
    if kind == "supervised":
        return {"id": row["id"], "input_ids": row["input_ids"], "labels": row["labels"]}
    record = {"id": row["id"]}
    for answer in ("chosen", "rejected"):
        input_ids, labels = pair_sequence(row["prompt_ids"], row[f"{answer}_ids"], row[f"{answer}_labels"])
        record.update({f"{answer}_input_ids": input_ids, f"{answer}_labels": labels})
    return record


def write_dump(samples: Any, path: str | os.PathLike, kind: DataKind = "supervised") -> int:
    """One JSON line per sample (`dump_record`), written to a temporary file and renamed, so an
    interrupted run never leaves a partial dump. Returns the number of lines."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    count = 0
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            for batch in samples.iter(batch_size=1000):
                for values in zip(*batch.values()):
                    record = dump_record(kind, dict(zip(batch, values)))
                    file.write(json.dumps(record, ensure_ascii=False) + "\n")
                    count += 1
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return count


def run_check_data(
    data_args: DataArguments,
    tokenizer: QwenTokenizerLike,
    model_max_length: int,
    output_dir: str | os.PathLike | None,
    *,
    per_device_batch_size: int = 1,
    kind: DataKind = "supervised",
) -> int:
    """Exit code 0 when the data is usable as `kind` (conversations or preference pairs), 1 with the
    error on stderr when it is not. With --dump_encoded, the kept training samples are written there
    (not packed, not padded)."""
    data_args = dataclasses.replace(data_args, lazy_preprocess=False)
    try:
        splits = encode_splits(
            data_args,
            tokenizer,
            data_args.encoding_options(model_max_length, kind),
            per_device_batch_size=per_device_batch_size,
            output_dir=output_dir,
        )
    except DataError as error:
        print(f"data error: {error}", file=sys.stderr, flush=True)
        return 1
    if data_args.dump_encoded:
        count = write_dump(splits.train.samples, data_args.dump_encoded, kind)
        unit = "pairs" if kind == "preference" else "samples"
        print(f"wrote {count} encoded {unit} to {data_args.dump_encoded}", flush=True)
    return 0

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

from .args import DataArguments
from .build import make_supervised_data
from .errors import DataError


def write_dump(samples: Any, path: str | os.PathLike) -> int:
    """One JSON line {id, input_ids, labels} per sample, written to a temporary file and renamed,
    so an interrupted run never leaves a partial dump. Returns the number of lines."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}-", dir=target.parent)
    count = 0
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            for batch in samples.iter(batch_size=1000):
                for sample_id, input_ids, labels in zip(batch["id"], batch["input_ids"], batch["labels"]):
                    record = {"id": sample_id, "input_ids": input_ids, "labels": labels}
                    file.write(json.dumps(record, ensure_ascii=False) + "\n")
                    count += 1
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return count


def run_check_data(
    data_args: DataArguments,
    tokenizer: Any,
    model_max_length: int,
    output_dir: str | os.PathLike | None,
    *,
    per_device_batch_size: int = 1,
) -> int:
    """Exit code 0 when the data is usable, 1 with the error on stderr when it is not. With
    --dump_encoded, the kept training samples are written there (not packed, not padded)."""
    try:
        data = make_supervised_data(
            dataclasses.replace(data_args, lazy_preprocess=False),
            tokenizer,
            model_max_length,
            per_device_batch_size=per_device_batch_size,
            output_dir=output_dir,
        )
    except DataError as error:
        print(f"data error: {error}", file=sys.stderr, flush=True)
        return 1
    if data_args.dump_encoded:
        count = write_dump(data.train_samples, data_args.dump_encoded)
        print(f"wrote {count} encoded samples to {data_args.dump_encoded}", flush=True)
    return 0

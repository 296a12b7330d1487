"""Child process: time the tokenisation of the alpaca_en conversations, uncached and cached.

    python bench/preprocess.py MODEL_DIR WORK_DIR [--workers 2] [--repeats 3]

Runs `make_supervised_data` (what finetune.py calls) with --preprocessing_num_workers WORKERS. The first
run, into a throwaway cache, is the warm-up (imports, tokenizer tables, the worker pool's first fork).
Then, `repeats` times: a run into a fresh, empty cache directory (reads, validates, tokenises with
WORKERS processes, writes the cache) and a second run on the same directory (a cache hit: the entry is
memory-mapped). Prints the times (median and all) as a result line.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path
from typing import Any

from configs import ALPACA_FILE
from memory import emit_result

from qwen_finetune.data import DataArguments, make_supervised_data
from qwen_finetune.model_loading import load_tokenizer

MAX_LENGTH = 2048


def timed_run(tokenizer: Any, cache_dir: Path, workers: int) -> tuple[float, dict[str, Any]]:
    data_args = DataArguments(
        data_path=str(ALPACA_FILE), preprocessing_num_workers=workers, data_cache_dir=str(cache_dir)
    )
    started = time.perf_counter()
    with redirect_stdout(StringIO()):
        data = make_supervised_data(data_args, tokenizer, MAX_LENGTH)
    return time.perf_counter() - started, data.report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    cli = parser.parse_args()
    cli.work_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(cli.model_dir, MAX_LENGTH)
    with tempfile.TemporaryDirectory(dir=cli.work_dir) as warm_up:
        timed_run(tokenizer, Path(warm_up), cli.workers)
    uncached, cached = [], []
    report: dict[str, Any] = {}
    for _ in range(cli.repeats):
        with tempfile.TemporaryDirectory(dir=cli.work_dir) as cache_dir:
            seconds, report = timed_run(tokenizer, Path(cache_dir), cli.workers)
            uncached.append(seconds)
            seconds, cached_report = timed_run(tokenizer, Path(cache_dir), cli.workers)
            if not cached_report["settings"]["from_cache"]:
                raise RuntimeError("the second run did not hit the cache: the cache key is not stable")
            cached.append(seconds)
    emit_result(
        {
            "file": str(ALPACA_FILE),
            "samples": report["train"]["samples_kept"],
            "workers": cli.workers,
            "max_length": MAX_LENGTH,
            "uncached_seconds": statistics.median(uncached),
            "cached_seconds": statistics.median(cached),
            "uncached_all": uncached,
            "cached_all": cached,
        }
    )


if __name__ == "__main__":
    main()

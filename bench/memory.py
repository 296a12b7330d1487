"""Run one measurement in a fresh process and read that process's own peak RSS.

Each configuration runs in its own child so that peaks do not mix: `os.wait4` returns the resource usage
of exactly that child (its ru_maxrss, in KiB on Linux), unlike RUSAGE_CHILDREN, which is the maximum over
every child waited for so far.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RESULT_PREFIX = "BENCH_RESULT "


@dataclass
class ChildRun:
    result: dict[str, Any] | None  # the JSON the child printed after RESULT_PREFIX, None if it failed
    peak_rss_bytes: int
    exit_code: int
    wall_seconds: float
    log_path: Path


def emit_result(result: dict[str, Any]) -> None:
    """Called by a child: print its result as one line the parent finds in the log."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> ChildRun:
    """Run `python ARGS` with stdout+stderr to `log_path`; return its result line and peak RSS."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, *args], stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    result = None
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
    return ChildRun(result, usage.ru_maxrss * 1024, process.returncode, wall, log_path)

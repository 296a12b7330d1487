"""Run one measurement in a fresh process and read that process's own peak RSS.

Each configuration runs in its own child so that peaks do not mix: `os.wait4` returns the resource usage
of exactly that child (its ru_maxrss, in KiB on Linux), unlike RUSAGE_CHILDREN, which is the maximum over
every child waited for so far. On Linux a child's ru_maxrss starts at the size of the process that started
it (the value survives exec), so the children are started by a small launcher process, itself started
once, rather than by the caller, which may hold gigabytes (a test session, the benchmark driver).
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


# The launcher: reads one JSON request per line (argv, env, log), runs it, answers with its exit status and
# ru_maxrss. Plain Python without imports beyond the standard library, so it stays a few MB.
_LAUNCHER = """
import json, os, subprocess, sys
for line in sys.stdin:
    request = json.loads(line)
    with open(request["log"], "w") as log:
        child = subprocess.Popen(request["argv"], stdout=log, stderr=subprocess.STDOUT, env=request["env"])
        _, status, usage = os.wait4(child.pid, 0)
    print(json.dumps({"exit_code": os.waitstatus_to_exitcode(status), "maxrss_kib": usage.ru_maxrss}), flush=True)
"""
_launcher: subprocess.Popen[str] | None = None


def _launch(argv: list[str], env: dict[str, str], log_path: Path) -> tuple[int, int]:
    """(exit code, peak RSS in bytes) of `argv`, run by the launcher (started on first use)."""
    global _launcher
    if _launcher is None or _launcher.poll() is not None:
        _launcher = subprocess.Popen(
            [sys.executable, "-S", "-c", _LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
    assert _launcher.stdin is not None and _launcher.stdout is not None
    _launcher.stdin.write(json.dumps({"argv": argv, "env": env, "log": str(log_path)}) + "\n")
    _launcher.stdin.flush()
    answer = json.loads(_launcher.stdout.readline())
    return answer["exit_code"], answer["maxrss_kib"] * 1024


def run_child(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> ChildRun:
    """Run `python ARGS` with stdout+stderr to `log_path`; return its result line and peak RSS."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    exit_code, peak_rss = _launch([sys.executable, *args], {**os.environ, **(env or {})}, log_path)
    wall = time.perf_counter() - started
    result = None
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
    return ChildRun(result, peak_rss, exit_code, wall, log_path)

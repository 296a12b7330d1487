"""How long a user waits: `python finetune.py --help`, and the time from the command to the first
logged training step of a tiny LoRA run (data/example.json, 2 steps, CPU).

    python bench/startup.py                 # this checkout
    python bench/startup.py --repo DIR      # another checkout (e.g. `git archive REV | tar -x -C DIR`),
                                            # run with this interpreter
Prints one line per measurement and, last, a JSON object with every figure. The machine's load
average is printed too: on a shared machine, compare figures measured side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from configs import REPO_ROOT

FIRST_STEP = b"step 1/"


def environment(repo: Path) -> dict[str, str]:
    env = {
        key: value for key, value in os.environ.items() if key not in ("QWEN_FINETUNE_VERBOSE", "PYTHONPATH")
    }
    env.update(
        {"PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    )
    return env


def time_help(repo: Path, repeat: int) -> dict[str, float | int]:
    times, lines = [], 0
    for _ in range(repeat):
        start = time.perf_counter()
        completed = subprocess.run(
            [sys.executable, "finetune.py", "--help"],
            cwd=repo,
            env=environment(repo),
            capture_output=True,
            check=True,
        )
        times.append(time.perf_counter() - start)
        lines = len(completed.stdout.decode().splitlines())
    return {
        "help_seconds_min": min(times),
        "help_seconds_median": statistics.median(times),
        "help_lines": lines,
    }


def time_first_step(repo: Path, model: Path, workdir: Path) -> tuple[float, float]:
    """(seconds from starting finetune.py to the first step's log line, CPU seconds of the whole run).
    CPU time depends less on what else the machine runs than wall time does."""
    command = [
        sys.executable,
        "finetune.py",
        "--model_name_or_path",
        str(model),
        "--data_path",
        "data/example.json",
    ]
    command += ["--use_lora", "--max_steps", "2", "--logging_steps", "1", "--save_strategy", "no"]
    command += ["--output_dir", str(workdir / "out"), "--data_cache_dir", str(workdir / "cache")]
    cpu_before = _children_cpu_seconds()
    start = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=repo, env=environment(repo), stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    assert process.stdout is not None
    seen = b""
    elapsed = None
    while chunk := process.stdout.read1(65536):
        seen = (seen + chunk)[-4096:]
        if elapsed is None and FIRST_STEP in seen:
            elapsed = time.perf_counter() - start
    if process.wait() != 0 or elapsed is None:
        raise RuntimeError(f"the training run failed or logged no step:\n{seen.decode(errors='replace')}")
    return elapsed, _children_cpu_seconds() - cpu_before


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--repo", type=Path, default=REPO_ROOT, help="checkout to measure (default: this one)"
    )
    parser.add_argument("--help-runs", type=int, default=5, help="--help runs (min and median are reported)")
    parser.add_argument(
        "--train-runs", type=int, default=3, help="training runs, each with a fresh data cache"
    )
    args = parser.parse_args()
    repo = args.repo.resolve()
    results: dict[str, object] = {"repo": str(repo), "load_average_at_start": os.getloadavg()[0]}
    results.update(time_help(repo, args.help_runs))
    print(f"--help: {results['help_seconds_min']:.2f} s (median {results['help_seconds_median']:.2f} s), "
          f"{results['help_lines']} lines", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        model = Path(scratch) / "tiny"
        subprocess.run(
            [sys.executable, "-m", "qwen_model.tiny", "--out", str(model)],
            cwd=REPO_ROOT, env=environment(REPO_ROOT), capture_output=True, check=True,
        )  # fmt: skip
        runs = [
            time_first_step(repo, model, Path(scratch) / f"run{index}") for index in range(args.train_runs)
        ]
    steps, cpu = [run[0] for run in runs], [run[1] for run in runs]
    results.update(
        {"first_step_seconds_min": min(steps), "first_step_seconds_median": statistics.median(steps)}
    )
    results["training_run_cpu_seconds_min"] = min(cpu)
    print(f"first training step: {min(steps):.2f} s (median {statistics.median(steps):.2f} s); "
          f"CPU time of the whole run {min(cpu):.2f} s", flush=True)  # fmt: skip
    results["load_average_at_end"] = os.getloadavg()[0]
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

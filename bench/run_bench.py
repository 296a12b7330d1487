"""Benchmark the toolkit against the original recipe and TRL on this machine: throughput, memory, MFU,
released model shapes, start-up and preprocessing.

    python bench/run_bench.py [--quick] [--steps N] [--modes full lora ...] [--lengths 512 2048]
                              [--real-shapes] [--profile NAME ...] [--publish]

Every configuration (trainer x model x mode x batching x model_max_length, see configs.py) trains in a
fresh process (bench/train_once.py for the toolkit, bench/trl_once.py for TRL's SFTTrainer) so that its
peak RSS, imports included, is its own. A large float32 matmul is timed at the start and the end of the
run (the MFU denominator); preprocessing (bench/preprocess.py) and start-up (bench/startup.py) are timed
in their own processes. With --real-shapes the released architectures (random weights, built once with
`python -m qwen_model.tiny`) train for a few micro-batches each, after the toolkit's memory plan says
they fit in --max-gb. Writes OUT/results.json, OUT/RESULTS.md, OUT/results.png and one log per child in
OUT/logs/; with --publish, also copies the three result files into bench/. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from configs import (
    BENCH_DIR,
    DATA_FILES,
    MODES,
    REAL_SHAPE_MICRO_BATCHES,
    REPO_ROOT,
    SMALL_MODEL,
    BenchConfig,
    default_matrix,
    dpo_matrix,
    finetune_flags,
    real_shape_matrix,
)
from flops import ModelShape, matmul_peak_flops
from memory import run_child
from plot import plot
from portable_paths import repository_relative
from report import add_ratios, derive, evaluate_targets, markdown

GPTQ_GROUP_SIZE = 32  # divides every quantized input width of the small model (320 and 864)
GIB = 2**30


def parse_cli(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 steps, baseline 1 step (development)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per configuration (>= 2)")
    parser.add_argument(
        "--baseline-steps",
        type=int,
        default=1,
        help="optimizer steps of the baseline runs (4 micro-batches each)",
    )
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--no-baseline", action="store_true", help="skip the original-recipe runs")
    parser.add_argument("--no-peers", action="store_true", help="skip the TRL runs (SFTTrainer, DPOTrainer)")
    parser.add_argument("--no-dpo", action="store_true", help="skip the DPO runs (toolkit and TRL)")
    parser.add_argument(
        "--dpo-steps", type=int, default=1, help="optimizer steps of the DPO runs (4 micro-batches each)"
    )
    parser.add_argument("--no-preprocessing", action="store_true", help="skip the tokenisation timing")
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up timing")
    parser.add_argument(
        "--real-shapes",
        action="store_true",
        help="also train the Qwen-1.8B and Qwen-7B shapes (random weights; ~20 GB RAM, ~4 and ~15 GB disk)",
    )
    parser.add_argument(
        "--real-micro-batches",
        type=int,
        default=REAL_SHAPE_MICRO_BATCHES,
        help="micro-batches per released-shape run (whole optimizer steps, >= 2)",
    )
    parser.add_argument(
        "--max-gb",
        type=float,
        default=22.0,
        help="released-shape runs whose planned peak (finetune.py --plan) exceeds this are not started",
    )
    parser.add_argument(
        "--only", nargs="+", default=None, help="run only these configurations (names like lora-packed-2048)"
    )
    parser.add_argument(
        "--profile",
        nargs="+",
        default=[],
        help="after measuring, rerun these configurations with torch.profiler on their last step",
    )
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results")
    parser.add_argument(
        "--models",
        type=Path,
        default=BENCH_DIR / "results" / "models",
        help="where the built models are kept",
    )
    parser.add_argument(
        "--publish", action="store_true", help="copy RESULTS.md/results.json/results.png to bench/"
    )
    cli = parser.parse_args(argv)
    if cli.quick:
        cli.steps, cli.baseline_steps = 2, 1
    if cli.steps < 2:
        parser.error(
            "--steps must be >= 2: a packed step is one micro-batch, and the first one is the warm-up"
        )
    if cli.real_micro_batches < 2:
        parser.error("--real-micro-batches must be >= 2: the first micro-batch is the warm-up")
    return cli


def check(run: Any, what: str) -> Any:
    if run.exit_code != 0:
        raise SystemExit(f"{what} failed (exit {run.exit_code}); see {run.log_path}")
    return run


def ensure_model(models: Path, size: str, out: Path) -> Path:
    """A random-init checkpoint of `size`, built once (deterministic) under `models`."""
    model_dir = models / size
    if not (model_dir / "config.json").is_file():
        print(f"building the {size} model ...", flush=True)
        command = ["-m", "qwen_model.tiny", "--out", str(model_dir), "--size", size]
        check(run_child(command, out / "logs" / f"make-{size}.log"), f"building the {size} model")
    return model_dir


def ensure_gptq(model_dir: Path, out: Path) -> Path:
    """The small model's GPTQ int4 version (run_gptq.py), built once beside it."""
    gptq_dir = model_dir.parent / f"{model_dir.name}-gptq-int4"
    if not (gptq_dir / "config.json").is_file():
        args = [
            str(REPO_ROOT / "run_gptq.py"),
            "--model_name_or_path",
            str(model_dir),
            "--data_path",
            str(DATA_FILES[0]),
            "--out_path",
            str(gptq_dir),
            "--bits",
            "4",
            "--group_size",
            str(GPTQ_GROUP_SIZE),
            "--num_samples",
            "32",
            "--max_len",
            "512",
            "--num_eval_samples",
            "4",
        ]
        check(run_child(args, out / "logs" / "make-gptq.log"), "GPTQ-quantizing the small model")
    return gptq_dir


def planned_peak_bytes(config: BenchConfig, model_dir: Path, work: Path) -> int:
    """The peak of the toolkit's own memory plan (`finetune.py --plan`) for this configuration's flags on
    this CPU, over the phases after loading: while weights load, the plan also counts the checkpoint's
    mapped pages, which are file-backed (the kernel drops them under memory pressure), so they do not
    decide whether a run fits."""
    from qwen_finetune.console import quiet_third_party

    quiet_third_party()  # the toolkit's imports load bitsandbytes, which prints on CPU machines
    from qwen_finetune.args import parse_args
    from qwen_finetune.memory_plan import device_by_name, plan_run

    model_args, data_args, training_args, lora_args = parse_args(
        finetune_flags(config, model_dir, model_dir, work)
    )
    cpu = device_by_name("cpu", platform.processor() or "CPU", 0, "fp32")
    plan = plan_run(
        model_args, data_args, training_args, lora_args, world_size=1, device=cpu, estimate_time=False
    )
    return max(size for phase, size in plan.memory.phases.items() if phase != "loading")


def fitting_variant(
    config: BenchConfig, model_dir: Path, out: Path, budget: float
) -> tuple[BenchConfig | None, int]:
    """The configuration as it fits in `budget` by the toolkit's memory plan: as is, else with activation
    checkpointing (the plan's first suggestion on CPU), else None; and the planned peak of the last try."""
    planned = 0
    for variant in (config, replace(config, checkpointing=True)):
        planned = planned_peak_bytes(variant, model_dir, out / "work" / variant.name)
        if planned <= budget:
            return variant, planned
    return None, planned


def run_config(
    config: BenchConfig, model_dir: Path, gptq_dir: Path | None, out: Path, profile: Path | None = None
) -> dict[str, Any] | None:
    work = out / "work" / config.name
    if config.trainer == "trl":
        args = [str(BENCH_DIR / "trl_once.py"), json.dumps(config.to_dict()), str(model_dir), str(work)]
    else:
        args = [
            str(BENCH_DIR / "train_once.py"),
            json.dumps(config.to_dict()),
            str(model_dir),
            str(gptq_dir or model_dir),
            str(work),
            "--data_cache_dir",
            str(out / "data_cache"),
        ]
    if profile is not None:
        args += ["--profile", str(profile)]
    suffix = "-profile" if profile is not None else ""
    env = {"GPTQMODEL_CPU_WORKERS": "2", "TOKENIZERS_PARALLELISM": "false"}
    loadavg = os.getloadavg()
    run = run_child(args, out / "logs" / f"{config.name}{suffix}.log", env)
    shutil.rmtree(work, ignore_errors=True)
    if run.result is None:
        print(f"  {config.name}: FAILED (exit {run.exit_code}), see {run.log_path}", flush=True)
        return None
    run.result.update(peak_rss_bytes=run.peak_rss_bytes, wall_seconds=run.wall_seconds, loadavg_start=loadavg)
    return run.result


def measure_startup(out: Path) -> dict[str, Any] | None:
    """bench/startup.py in its own process: --help, and the command to the first step of a tiny run."""
    log = out / "logs" / "startup.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    completed = subprocess.run(
        [sys.executable, str(BENCH_DIR / "startup.py")], capture_output=True, text=True, cwd=REPO_ROOT
    )
    log.write_text(completed.stdout + completed.stderr)
    if completed.returncode != 0:
        print(f"  start-up: FAILED (exit {completed.returncode}), see {log}", flush=True)
        return None
    return json.loads(completed.stdout.strip().splitlines()[-1])


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def select(configs: list[BenchConfig], only: list[str] | None) -> list[BenchConfig]:
    return [config for config in configs if only is None or config.name in only]


def main(argv: list[str] | None = None) -> None:
    cli = parse_cli(argv)
    out: Path = cli.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    models: Path = cli.models.resolve()
    command = "python bench/run_bench.py " + " ".join(shlex.quote(arg) for arg in (argv or sys.argv[1:]))
    started = time.perf_counter()
    loadavg_start = os.getloadavg()
    configs = default_matrix(
        cli.modes,
        cli.lengths,
        cli.steps,
        cli.baseline_steps,
        baseline=not cli.no_baseline,
        peers=not cli.no_peers,
    )
    if not cli.no_dpo and "lora" in cli.modes:
        configs += dpo_matrix(cli.dpo_steps, peers=not cli.no_peers)
    if cli.real_shapes:
        configs += real_shape_matrix(cli.real_micro_batches)
    configs = select(configs, cli.only)
    names = {name for config in configs for name in (config.name, replace(config, checkpointing=True).name)}
    unknown = [name for name in cli.profile if name not in names]
    if unknown:
        raise SystemExit(f"--profile {' '.join(unknown)}: not a configuration of this run")
    model_dirs = {size: ensure_model(models, size, out) for size in dict.fromkeys(c.model for c in configs)}
    small_dir = model_dirs.get(SMALL_MODEL) or ensure_model(models, SMALL_MODEL, out)
    gptq_dir = ensure_gptq(small_dir, out) if any(c.mode == "qlora_int4" for c in configs) else None
    small_shape = ModelShape.from_config(json.loads((small_dir / "config.json").read_text()))

    peak = matmul_peak_flops()
    print(
        f"matmul peak: {peak['peak_flops'] / 1e9:.1f} GFLOP/s (float32, {peak['threads']} threads)",
        flush=True,
    )

    preprocessing = None
    if not cli.no_preprocessing:
        run = check(
            run_child(
                [str(BENCH_DIR / "preprocess.py"), str(small_dir), str(out / "preprocess")],
                out / "logs" / "preprocess.log",
            ),
            "the preprocessing benchmark",
        )
        preprocessing = run.result
        print(
            f"preprocessing: uncached {preprocessing['uncached_seconds']:.2f} s, cached "
            f"{preprocessing['cached_seconds']:.3f} s",
            flush=True,
        )
    startup = None
    if not cli.no_startup:
        startup = measure_startup(out)
        if startup is not None:
            print(
                f"start-up: first training step after {startup['first_step_seconds_min']:.1f} s", flush=True
            )

    raw_results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    ran: dict[str, BenchConfig] = {}  # by requested and by run name (a released shape may add -gc)
    for requested in configs:
        config: BenchConfig | None = requested
        planned: int | None = None
        if requested.model != SMALL_MODEL:
            config, planned = fitting_variant(requested, model_dirs[requested.model], out, cli.max_gb * GIB)
        if config is None:
            planned = planned or 0
            reason = f"planned peak {planned / GIB:.1f} GiB > --max-gb {cli.max_gb:g}, with checkpointing too"
            print(f"skipping {requested.name}: {reason}", flush=True)
            skipped.append({**requested.to_dict(), "reason": reason, "planned_peak_bytes": planned})
            continue
        ran[requested.name] = ran[config.name] = config
        print(f"running {config.name} ...", flush=True)
        result = run_config(config, model_dirs[config.model], gptq_dir, out)
        if result is None:
            continue
        result["planned_peak_bytes"] = planned
        raw_results.append(result)
        figures = derive(result, peak["peak_flops"])
        print(
            f"  {figures['effective_tokens_per_second']:.1f} tok/s, peak RSS "
            f"{figures['peak_rss_bytes'] / GIB:.2f} GiB, MFU {100 * figures['mfu']:.1f}%, "
            f"load {result['loadavg_start'][0]:.2f}->{result['loadavg_end'][0]:.2f}, "
            f"{result['wall_seconds']:.0f} s",
            flush=True,
        )

    peak_end = matmul_peak_flops()
    # The higher of the two measurements is the machine's attainable peak (load only ever lowers it).
    peak_flops = max(peak["peak_flops"], peak_end["peak_flops"])
    rows = [derive(raw, peak_flops) for raw in raw_results]
    add_ratios(rows)
    index = json.loads((small_dir / "model.safetensors.index.json").read_text())
    summary = {
        "command": command,
        "machine": machine_info(),
        "loadavg_start": [round(value, 2) for value in loadavg_start],
        "loadavg_end": [round(value, 2) for value in os.getloadavg()],
        "matmul_peak": {**peak, "size_rates": ", ".join(f"{k}^3" for k in peak["by_size"])},
        "matmul_peak_end": peak_end,
        "peak_flops_used": peak_flops,
        "model": {
            "total_parameters": index["metadata"]["total_parameters"],
            "vocab": small_shape.vocab,
            "shape": small_shape.__dict__,
        },
        "data_files": [path.name for path in DATA_FILES],
        "steps": cli.steps,
        "baseline_steps": cli.baseline_steps,
        "preprocessing": preprocessing,
        "startup": startup,
        "targets": evaluate_targets(rows, preprocessing),
        "rows": rows,
        "skipped": skipped,
        "raw": raw_results,
    }
    for config_name in cli.profile:
        profiled = ran.get(config_name)
        if profiled is None:
            raise SystemExit(f"--profile {config_name}: not a configuration run here")
        print(f"profiling {config_name} ...", flush=True)
        profile = out / f"profile-{config_name}.txt"
        run_config(profiled, model_dirs[profiled.model], gptq_dir, out, profile=profile)
    summary["wall_seconds"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(repository_relative(summary), indent=1) + "\n")
    (out / "RESULTS.md").write_text(markdown(summary))
    if rows:
        plot(
            rows,
            out / "results.png",
            f"CPU, {summary['machine']['cores']} cores, matmul peak {peak_flops / 1e9:.0f} GFLOP/s",
        )
    print(markdown(summary), flush=True)
    if cli.publish:
        for name in ("results.json", "RESULTS.md", "results.png"):
            if (out / name).is_file():
                shutil.copy(out / name, BENCH_DIR / name)
    print(f"done in {summary['wall_seconds']:.0f} s; results in {out}", flush=True)


if __name__ == "__main__":
    main()

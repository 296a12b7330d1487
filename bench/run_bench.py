"""Benchmark the toolkit against the original recipe on this machine: throughput, memory, MFU, preprocessing.

    python bench/run_bench.py [--quick] [--steps N] [--modes full lora ...] [--lengths 512 2048]

Every configuration (mode x batching x model_max_length, see configs.py) trains the `small` model in a
fresh process (bench/train_once.py) so that its peak RSS is its own. A large float32 matmul is timed at
the start and the end of the run (the MFU denominator), and preprocessing is timed in its own process
(bench/preprocess.py). Writes OUT/results.json, OUT/RESULTS.md, OUT/results.png and one log per child in
OUT/logs/; with --publish, also copies the three result files into bench/. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from configs import DATA_FILES, MODES, REPO_ROOT, BenchConfig, default_matrix
from flops import ModelShape, matmul_peak_flops
from memory import run_child
from plot import plot
from report import add_baseline_ratios, derive, evaluate_targets, markdown

BENCH_DIR = Path(__file__).resolve().parent
GPTQ_GROUP_SIZE = 32  # divides every quantized input width of the small model (320 and 864)


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
    parser.add_argument("--no-preprocessing", action="store_true", help="skip the tokenisation timing")
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
    return cli


def ensure_models(models: Path, out: Path, need_gptq: bool) -> tuple[Path, Path]:
    """The small model and its GPTQ int4 version, built once (deterministic) under `models`."""
    model_dir, gptq_dir = models / "small", models / "small-gptq-int4"
    if not (model_dir / "config.json").is_file():
        check(
            run_child(
                ["-m", "qwen_model.tiny", "--out", str(model_dir), "--size", "small"],
                out / "logs" / "make-small.log",
            ),
            "building the small model",
        )
    if need_gptq and not (gptq_dir / "config.json").is_file():
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
    return model_dir, gptq_dir


def check(run: Any, what: str) -> Any:
    if run.exit_code != 0:
        raise SystemExit(f"{what} failed (exit {run.exit_code}); see {run.log_path}")
    return run


def run_config(
    config: BenchConfig, model_dir: Path, gptq_dir: Path, out: Path, profile: Path | None = None
) -> dict[str, Any] | None:
    work = out / "work" / config.name
    args = [
        str(BENCH_DIR / "train_once.py"),
        json.dumps(config.to_dict()),
        str(model_dir),
        str(gptq_dir),
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


def main(argv: list[str] | None = None) -> None:
    cli = parse_cli(argv)
    out: Path = cli.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/run_bench.py " + " ".join(shlex.quote(arg) for arg in (argv or sys.argv[1:]))
    started = time.perf_counter()
    loadavg_start = os.getloadavg()
    model_dir, gptq_dir = ensure_models(cli.models.resolve(), out, need_gptq="qlora_int4" in cli.modes)
    model_config = json.loads((model_dir / "config.json").read_text())
    shape = ModelShape.from_config(model_config)

    peak = matmul_peak_flops()
    print(
        f"matmul peak: {peak['peak_flops'] / 1e9:.1f} GFLOP/s (float32, {peak['threads']} threads)",
        flush=True,
    )

    preprocessing = None
    if not cli.no_preprocessing:
        run = check(
            run_child(
                [str(BENCH_DIR / "preprocess.py"), str(model_dir), str(out / "preprocess")],
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

    configs = default_matrix(
        cli.modes, cli.lengths, cli.steps, cli.baseline_steps, baseline=not cli.no_baseline
    )
    if cli.only:
        configs = [config for config in configs if config.name in cli.only]
    raw_results = []
    for config in configs:
        print(f"running {config.name} ...", flush=True)
        result = run_config(config, model_dir, gptq_dir, out)
        if result is not None:
            raw_results.append(result)
            figures = derive(result, shape, peak["peak_flops"])
            print(
                f"  {figures['effective_tokens_per_second']:.1f} tok/s, peak RSS "
                f"{figures['peak_rss_bytes'] / 2**30:.2f} GiB, MFU {100 * figures['mfu']:.1f}%, "
                f"load {result['loadavg_start'][0]:.2f}->{result['loadavg_end'][0]:.2f}",
                flush=True,
            )

    peak_end = matmul_peak_flops()
    # The higher of the two measurements is the machine's attainable peak (load only ever lowers it).
    peak_flops = max(peak["peak_flops"], peak_end["peak_flops"])
    rows = [derive(raw, shape, peak_flops) for raw in raw_results]
    add_baseline_ratios(rows)
    total_parameters = raw_results[0]["total_parameters"] if raw_results else 0
    full_rows = [raw for raw in raw_results if raw["config"]["mode"] == "full"]
    summary = {
        "command": command,
        "machine": machine_info(),
        "loadavg_start": [round(value, 2) for value in loadavg_start],
        "loadavg_end": [round(value, 2) for value in os.getloadavg()],
        "matmul_peak": {**peak, "size_rates": ", ".join(f"{k}^3" for k in peak["by_size"])},
        "matmul_peak_end": peak_end,
        "peak_flops_used": peak_flops,
        "model": {
            "total_parameters": full_rows[0]["total_parameters"] if full_rows else total_parameters,
            "vocab": shape.vocab,
            "shape": shape.__dict__,
        },
        "data_files": [path.name for path in DATA_FILES],
        "steps": cli.steps,
        "baseline_steps": cli.baseline_steps,
        "preprocessing": preprocessing,
        "targets": evaluate_targets(rows, preprocessing),
        "rows": rows,
        "raw": raw_results,
        "wall_seconds": time.perf_counter() - started,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "RESULTS.md").write_text(markdown(summary))
    title = (
        f"small Qwen model ({summary['model']['total_parameters'] / 1e6:.0f}M params), CPU "
        f"{summary['machine']['cores']} cores, matmul peak {peak_flops / 1e9:.0f} GFLOP/s"
    )
    if rows:
        plot(rows, out / "results.png", title)
    for config_name in cli.profile:
        config = next((config for config in configs if config.name == config_name), None)
        if config is None:
            raise SystemExit(f"--profile {config_name}: not a configuration of this run")
        print(f"profiling {config_name} ...", flush=True)
        run_config(config, model_dir, gptq_dir, out, profile=out / f"profile-{config_name}.txt")
    print(markdown(summary), flush=True)
    if cli.publish:
        for name in ("results.json", "RESULTS.md", "results.png"):
            if (out / name).is_file():
                shutil.copy(out / name, BENCH_DIR / name)
    print(f"done in {summary['wall_seconds']:.0f} s; results in {out}", flush=True)


if __name__ == "__main__":
    main()

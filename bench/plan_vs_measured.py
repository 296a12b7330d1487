"""The memory plan (`finetune.py --plan`) against the measured peak RSS of the same finetune.py runs on CPU.

    python bench/plan_vs_measured.py [--models tiny small qwen-1.8b] [--modes lora full nf4]
                                     [--lengths 512 2048] [--max-gb 21] [--checkpointing-when-needed]
                                     [--publish]

For every (model, mode, model_max_length) the plan is made from the flags in this process, then the
same flags train for two optimizer steps in a fresh `python finetune.py` child whose own peak RSS is
read with os.wait4 (bench/memory.py). Runs: float32, packed rows of model_max_length, batch 1, no
gradient accumulation, no gradient checkpointing, data alpaca_en. The models are random-init ones
built by `python -m qwen_model.tiny` under bench/results/models/. A run whose plan does not fit in
--max-gb is not started; its row shows the plan. With --checkpointing-when-needed such a run is planned
again with activation checkpointing (the plan's first suggestion on CPU) and measured that way if it
then fits.

Writes OUT/plan_vs_measured.json and OUT/PLAN_VS_MEASURED.md (OUT: bench/results/plan_vs_measured);
--publish copies both into bench/. The "implied runtime" column is measured minus the plan's tensors:
the process's own footprint, which the plan takes as a constant (memory.CPU_PROCESS_BYTES).

Time: the tiny and small rows take about 10 minutes on 2 cores; the qwen-1.8b rows (building the
3.7 GB checkpoint once, then LoRA and Q-LoRA nf4 at 512 tokens, planned at 15 and 11 GB; the other
1.8B rows do not fit in 21 GB and are only planned) add roughly 20 minutes. Run them on a quiet machine:
they need most of a 24 GB machine's memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from configs import ALPACA_FILE, BENCH_DIR, REPO_ROOT
from memory import run_child
from portable_paths import repository_relative

from qwen_finetune.console import quiet_third_party

quiet_third_party()  # as finetune.py does: TrainingArguments imports peft, which loads bitsandbytes

from qwen_finetune.args import parse_args  # noqa: E402
from qwen_finetune.memory_plan import RunPlan, device_by_name, plan_run  # noqa: E402
from qwen_model.tiny import tiny_config, tiny_generation_config  # noqa: E402

MODE_FLAGS = {
    "lora": ["--use_lora", "--train_embeddings", "no"],
    "full": [],
    "nf4": ["--use_lora", "--q_lora", "--q_lora_backend", "nf4"],
}
MODE_LABELS = {"lora": "LoRA", "full": "full", "nf4": "Q-LoRA nf4"}
TOLERANCE = 0.15
GB = 1e9


def parse_cli(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "small", "qwen-1.8b"])
    parser.add_argument("--modes", nargs="+", default=list(MODE_FLAGS), choices=list(MODE_FLAGS))
    parser.add_argument("--lengths", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--max-gb", type=float, default=21.0, help="runs planned above this are skipped")
    parser.add_argument(
        "--checkpointing-when-needed",
        action="store_true",
        help="plan a run that does not fit again with --gradient_checkpointing, and measure it so if it fits",
    )
    parser.add_argument(
        "--plan-only",
        nargs="+",
        default=[],
        help="of --models, only plan these (from their config.json alone), train none of them",
    )
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "results" / "plan_vs_measured")
    parser.add_argument("--model-dir", type=Path, default=BENCH_DIR / "results" / "models")
    parser.add_argument("--publish", action="store_true", help="copy the results into bench/")
    return parser.parse_args(argv)


def ensure_model(size: str, models: Path, logs: Path, plan_only: bool) -> Path:
    """The random-init checkpoint of this size, built once; for a plan alone its config files suffice."""
    directory = models / size
    if plan_only and not (directory / "config.json").is_file():
        directory = models / f"{size}-config-only"
        tiny_config(size).save_pretrained(directory)
        tiny_generation_config(base=False).save_pretrained(directory)
        return directory
    if not (directory / "config.json").is_file():
        run = run_child(
            ["-m", "qwen_model.tiny", "--out", str(directory), "--size", size], logs / f"make-{size}.log"
        )
        if run.exit_code != 0:
            raise SystemExit(f"building {size} failed; see {run.log_path}")
    return directory


def finetune_flags(model_dir: Path, mode: str, length: int, work: Path) -> list[str]:
    return [
        "--model_name_or_path",
        str(model_dir),
        "--data_path",
        str(ALPACA_FILE),
        "--model_max_length",
        str(length),
        "--packing",
        "--output_dir",
        str(work / "output"),
        "--overwrite_output_dir",
        "--per_device_train_batch_size",
        "1",
        "--gradient_accumulation_steps",
        "1",
        "--max_steps",
        "2",
        "--learning_rate",
        "1e-4",
        "--lr_scheduler_type",
        "constant",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--disable_tqdm",
        "true",
        "--logging_steps",
        "1000",
        "--dataloader_num_workers",
        "0",
        "--data_cache_dir",
        str(work.parent / "data_cache"),
        "--use_cpu",
        *MODE_FLAGS[mode],
    ]


def plan_of(flags: list[str], cli: argparse.Namespace) -> RunPlan:
    cpu = device_by_name("cpu", platform.processor() or "CPU", int(cli.max_gb * GB), "fp32")
    return plan_run(*parse_args(flags), world_size=1, device=cpu)


def measure_row(
    size: str, model_dir: Path, mode: str, length: int, cli: argparse.Namespace
) -> dict[str, Any]:
    work = cli.out / "work" / f"{size}-{mode}-{length}"
    flags = finetune_flags(model_dir, mode, length, work)
    plan = plan_of(flags, cli)
    checkpointing = False
    if plan.peak_bytes > cli.max_gb * GB and cli.checkpointing_when_needed:
        with_checkpointing = plan_of([*flags, "--gradient_checkpointing"], cli)
        if with_checkpointing.peak_bytes <= cli.max_gb * GB:
            flags, plan, checkpointing = [*flags, "--gradient_checkpointing"], with_checkpointing, True
    row: dict[str, Any] = {
        "model": size,
        "mode": mode,
        "max_length": length,
        "checkpointing": checkpointing,
        "plan_bytes": plan.peak_bytes,
        "plan_phase": plan.memory.peak_phase,
        "plan": plan.to_json(),
        "flags": flags,
    }
    if plan.peak_bytes > cli.max_gb * GB:
        row["skipped"] = f"planned {plan.peak_bytes / GB:.1f} GB > {cli.max_gb:g} GB"
        return row
    if size in cli.plan_only:
        row["skipped"] = "planned only (--plan-only)"
        return row
    row["loadavg_start"] = os.getloadavg()
    run = run_child(
        [str(REPO_ROOT / "finetune.py"), *flags], cli.out / "logs" / f"{size}-{mode}-{length}.log"
    )
    shutil.rmtree(work, ignore_errors=True)
    row.update(
        measured_bytes=run.peak_rss_bytes,
        exit_code=run.exit_code,
        wall_seconds=run.wall_seconds,
        loadavg_end=os.getloadavg(),
        ratio=plan.peak_bytes / run.peak_rss_bytes,
        implied_runtime_bytes=run.peak_rss_bytes - (plan.peak_bytes - plan.memory.component("runtime")),
    )
    return row


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# The memory plan against measured peak RSS (CPU)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']}, torch {meta['torch']} ({meta['threads']} threads). "
        f"Load average at start {meta['loadavg_start']}, at end {meta['loadavg_end']}. "
        f"Total time {meta['seconds'] / 60:.1f} min.",
        "",
        "Every run: float32, packed rows of model_max_length, batch 1, no accumulation, no gradient "
        "checkpointing (unless the mode says act. ckpt), 2 optimizer steps of `finetune.py` in its own process (peak RSS of that process). "
        f"Target: plan within {TOLERANCE:.0%} of the measurement.",
        "",
        "| model | mode | tokens | plan GB (peak phase) | measured GB | plan / measured | within 15% | "
        "weights | activations | loss buffers | optimizer + gradients | implied runtime GB | run s |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        components = row["plan"]["components"]
        weights = components.get("weights", 0) + components.get("autocast weight copies", 0)
        state = components.get("optimizer states", 0) + components.get("gradients", 0)
        plan = f"{row['plan_bytes'] / GB:.2f} ({row['plan_phase']})"
        parts = (
            f"{weights / GB:.2f} | {components.get('activations', 0) / GB:.2f} | "
            f"{components.get('loss buffers', 0) / GB:.2f} | {state / GB:.2f}"
        )
        mode = MODE_LABELS[row["mode"]] + (" (act. ckpt)" if row.get("checkpointing") else "")
        label = f"| {row['model']} | {mode} | {row['max_length']} | {plan} |"
        if "skipped" in row:
            lines.append(f"{label} not run: {row['skipped']} | - | - | {parts} | - | - |")
            continue
        if row["exit_code"] != 0:
            lines.append(f"{label} failed (exit {row['exit_code']}) | - | - | {parts} | - | - |")
            continue
        within = "yes" if abs(row["ratio"] - 1) <= TOLERANCE else "**no**"
        lines.append(
            f"{label} {row['measured_bytes'] / GB:.2f} | {row['ratio']:.3f} | {within} | {parts} | "
            f"{row['implied_runtime_bytes'] / GB:.2f} | {row['wall_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    cli = parse_cli(argv)
    started = time.perf_counter()
    meta: dict[str, Any] = {
        "command": "python bench/plan_vs_measured.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "loadavg_start": [round(value, 2) for value in os.getloadavg()],
    }
    rows = []
    for size in cli.models:
        model_dir = ensure_model(size, cli.model_dir, cli.out / "logs", plan_only=size in cli.plan_only)
        for mode in cli.modes:
            for length in cli.lengths:
                row = measure_row(size, model_dir, mode, length, cli)
                rows.append(row)
                print(
                    json.dumps(
                        {key: row.get(key) for key in ("model", "mode", "max_length", "ratio", "skipped")}
                    )
                )
    meta["loadavg_end"] = [round(value, 2) for value in os.getloadavg()]
    meta["seconds"] = time.perf_counter() - started
    cli.out.mkdir(parents=True, exist_ok=True)
    (cli.out / "plan_vs_measured.json").write_text(
        json.dumps(repository_relative({"meta": meta, "rows": rows}), indent=2) + "\n"
    )
    (cli.out / "PLAN_VS_MEASURED.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    if cli.publish:
        shutil.copy(cli.out / "plan_vs_measured.json", BENCH_DIR / "plan_vs_measured.json")
        shutil.copy(cli.out / "PLAN_VS_MEASURED.md", BENCH_DIR / "PLAN_VS_MEASURED.md")


if __name__ == "__main__":
    main()

"""Figures from raw child results: rates, ratios to the baseline, MFU, targets; and the Markdown tables."""

from __future__ import annotations

from typing import Any

from configs import BATCHING_LABELS, MODE_LABELS
from flops import ModelShape, StepTokens, executed_flops, model_flops

GIB = 2**30
TARGETS = {
    "speedup_512": 2.5,
    "speedup_2048": 8.0,
    "memory_ratio_2048": 0.6,
    "mfu_full_2048": 0.40,
    "preprocess_uncached_seconds": 2.0,
    "preprocess_cached_seconds": 0.5,
}


def derive(raw: dict[str, Any], shape: ModelShape, peak_flops: float) -> dict[str, Any]:
    """Per-configuration figures over the measured micro-batches.

    The baseline's step time does not depend on which samples it holds (every row has model_max_length
    positions), so its non-padding share is taken from the whole dataset rather than from the few measured
    samples: effective tokens/s = positions/s x (dataset tokens / (samples x model_max_length)). This
    removes sampling noise without favouring either side; the directly counted figure is kept as
    `effective_tokens_per_second_counted`.
    """
    config = raw["config"]
    tokens = StepTokens(**raw["tokens"])
    seconds = raw["seconds"]
    mode = config["mode"]
    baseline = config["batching"] == "padded"
    counted = tokens.real_tokens / seconds
    if baseline:
        slots = raw["data"]["samples_kept"] * config["max_length"]
        real_share = raw["data"]["total_tokens"] / slots
        effective = tokens.padded_tokens / seconds * real_share
        supervised = tokens.padded_tokens / seconds * raw["data"]["supervised_tokens"] / slots
        padding = 1 - real_share
        scale = effective / counted  # model FLOPs are linear in the token counts
    else:
        effective, supervised = counted, tokens.supervised / seconds
        padding = 1 - tokens.real_tokens / tokens.padded_tokens
        scale = 1.0
    useful = model_flops(shape, mode, raw["lora_rank"], tokens) * scale
    executed = executed_flops(
        shape, mode, raw["lora_rank"], tokens, full_logits=baseline, packed=config["batching"] == "packed"
    )
    return {
        "name": f"{mode}-{config['batching']}-{config['max_length']}",
        "mode": mode,
        "batching": config["batching"],
        "max_length": config["max_length"],
        "optimizer_steps": config["steps"],
        "measured_micro_batches": raw["measured_micro_batches"],
        "seconds": seconds,
        "measured_real_tokens": tokens.real_tokens,
        "effective_tokens_per_second": effective,
        "effective_tokens_per_second_counted": counted,
        "supervised_tokens_per_second": supervised,
        "padding_fraction": padding,
        "peak_rss_bytes": raw["peak_rss_bytes"],
        "rss_after_load_bytes": raw["rss_after_load_bytes"],
        "model_flops_per_second": useful / seconds,
        "mfu": useful / seconds / peak_flops,
        "executed_flops_per_second": executed / seconds,
        "executed_utilisation": executed / seconds / peak_flops,
        "trainable_parameters": raw["trainable_parameters"],
        "total_parameters": raw["total_parameters"],
        "train_loss": raw["train_loss"],
        "loadavg_start": raw["loadavg_start"],
        "loadavg_end": raw["loadavg_end"],
    }


def add_baseline_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's throughput and peak memory relative to the baseline at the same length."""
    baselines = {
        row["max_length"]: row for row in rows if row["batching"] == "padded" and row["mode"] == "lora"
    }
    for row in rows:
        baseline = baselines.get(row["max_length"])
        if baseline is None:
            continue
        row["speedup_vs_baseline"] = (
            row["effective_tokens_per_second"] / baseline["effective_tokens_per_second"]
        )
        row["memory_vs_baseline"] = row["peak_rss_bytes"] / baseline["peak_rss_bytes"]


def _find(rows: list[dict[str, Any]], mode: str, batching: str, length: int) -> dict[str, Any] | None:
    for row in rows:
        if (row["mode"], row["batching"], row["max_length"]) == (mode, batching, length):
            return row
    return None


def evaluate_targets(
    rows: list[dict[str, Any]], preprocessing: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """One entry per target that this run measured: value, threshold, met, and the configuration used."""
    results = []

    def add(target: str, description: str, value: float, higher_is_better: bool, source: str) -> None:
        threshold = TARGETS[target]
        met = value >= threshold if higher_is_better else value <= threshold
        results.append(
            {
                "target": target,
                "description": description,
                "value": value,
                "threshold": threshold,
                "met": met,
                "source": source,
            }
        )

    for length, target in ((512, "speedup_512"), (2048, "speedup_2048")):
        for batching in ("grouped", "packed"):
            row = _find(rows, "lora", batching, length)
            if row and "speedup_vs_baseline" in row:
                add(
                    target,
                    f"LoRA effective tokens/s vs baseline at {length} ({BATCHING_LABELS[batching]})",
                    row["speedup_vs_baseline"],
                    True,
                    row["name"],
                )
    for batching in ("grouped", "packed"):
        row = _find(rows, "lora", batching, 2048)
        if row and "memory_vs_baseline" in row:
            add(
                "memory_ratio_2048",
                f"LoRA peak RSS vs baseline at 2048 ({BATCHING_LABELS[batching]})",
                row["memory_vs_baseline"],
                False,
                row["name"],
            )
    full = _find(rows, "full", "packed", 2048)
    if full:
        add("mfu_full_2048", "MFU of full fine-tuning at 2048 (packing)", full["mfu"], True, full["name"])
    if preprocessing:
        add(
            "preprocess_uncached_seconds",
            f"tokenise {preprocessing['samples']} alpaca_en conversations, {preprocessing['workers']} workers, "
            "after warm-up (s)",
            preprocessing["uncached_seconds"],
            False,
            "bench/preprocess.py",
        )
        add(
            "preprocess_cached_seconds",
            "same, second run from the cache (s)",
            preprocessing["cached_seconds"],
            False,
            "bench/preprocess.py",
        )
    return results


def _ratio(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.2f}x" if key in row else "-"


def results_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| max len | mode | batching | steps (measured micro-batches) | measured real tokens | effective tok/s | supervised tok/s | padding | "
        "peak RSS GiB | MFU | executed | vs baseline tok/s | vs baseline RSS | loss |\n"
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    for row in rows:
        lines.append(
            f"| {row['max_length']} | {MODE_LABELS[row['mode']]} | {row['batching']} | "
            f"{row['optimizer_steps']} ({row['measured_micro_batches']}) | {row['measured_real_tokens']} | "
            f"{row['effective_tokens_per_second']:.1f} | "
            f"{row['supervised_tokens_per_second']:.1f} | {100 * row['padding_fraction']:.1f}% | "
            f"{row['peak_rss_bytes'] / GIB:.2f} | {100 * row['mfu']:.1f}% | "
            f"{100 * row['executed_utilisation']:.1f}% | {_ratio(row, 'speedup_vs_baseline')} | "
            f"{_ratio(row, 'memory_vs_baseline')} | {row['train_loss']:.3f} |"
        )
    return "\n".join(lines)


def targets_table(targets: list[dict[str, Any]]) -> str:
    lines = ["| target | measured | threshold | met | configuration |", "|---|---:|---:|---|---|"]
    for entry in targets:
        kind = "<=" if entry["target"].startswith(("memory", "preprocess")) else ">="
        value = entry["value"]
        shown = f"{100 * value:.1f}%" if entry["target"].startswith("mfu") else f"{value:.2f}"
        threshold = (
            f"{100 * entry['threshold']:.0f}%"
            if entry["target"].startswith("mfu")
            else f"{entry['threshold']}"
        )
        lines.append(
            f"| {entry['description']} | {shown} | {kind} {threshold} | {'yes' if entry['met'] else '**no**'} | "
            f"{entry['source']} |"
        )
    return "\n".join(lines)


def markdown(summary: dict[str, Any]) -> str:
    """RESULTS.md: the run's conditions, the per-configuration table and the targets."""
    peak = summary["matmul_peak"]
    machine = summary["machine"]
    lines = [
        "# Benchmark results",
        "",
        f"Command: `{summary['command']}`",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, torch {machine['torch']} ({peak['threads']} threads). "
        f"Load average at start {summary['loadavg_start']}, at end {summary['loadavg_end']}.",
        f"Matmul peak (float32, {peak['threads']} threads, best of 5 at sizes {peak['size_rates']}): "
        f"{peak['peak_flops'] / 1e9:.1f} GFLOP/s at the start, {summary['matmul_peak_end']['peak_flops'] / 1e9:.1f} "
        f"GFLOP/s at the end; MFU divides by the higher, **{summary['peak_flops_used'] / 1e9:.1f} GFLOP/s**.",
        f"Model: `small` ({summary['model']['total_parameters'] / 1e6:.1f}M parameters, vocabulary "
        f"{summary['model']['vocab']}), float32 weights. Data: {', '.join(summary['data_files'])}. "
        f"Optimizer steps per configuration: {summary['steps']} ({summary['baseline_steps']} for the baseline); "
        "the first micro-batch of each run is its warm-up and is not measured.",
        "",
        "## Targets",
        "",
        targets_table(summary["targets"]),
        "",
        "## Per configuration",
        "",
        results_table(summary["rows"]),
        "",
    ]
    preprocessing = summary.get("preprocessing")
    if preprocessing:
        lines += [
            "## Preprocessing",
            "",
            f"{preprocessing['samples']} alpaca_en conversations, {preprocessing['workers']} workers, model_max_length "
            f"{preprocessing['max_length']}: uncached {preprocessing['uncached_seconds']:.2f} s (runs "
            f"{', '.join(f'{s:.2f}' for s in preprocessing['uncached_all'])}), cached "
            f"{preprocessing['cached_seconds']:.3f} s (runs {', '.join(f'{s:.3f}' for s in preprocessing['cached_all'])}).",
            "",
        ]
    return "\n".join(lines)

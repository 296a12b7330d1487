"""Figures from raw child results: rates, ratios to the baseline and to TRL, MFU, targets; the Markdown."""

from __future__ import annotations

from typing import Any

from configs import BATCHING_LABELS, MODE_LABELS, SMALL_MODEL, TRAINER_LABELS, BenchConfig
from flops import (
    CHECKPOINTED_LOSS,
    FUSED_LOSS,
    ORIGINAL_LOSS,
    TRL_CPU_LOSS,
    ModelShape,
    OutputLayerWork,
    StepTokens,
    executed_flops,
    model_flops,
)

GIB = 2**30
TARGETS = {
    "speedup_512": 2.5,
    "speedup_2048": 8.0,
    "memory_ratio_2048": 0.6,
    "speedup_vs_trl_512": 5.0,
    "speedup_vs_trl_2048": 5.0,
    "memory_vs_trl_2048": 0.4,
    "dpo_speedup_vs_trl_1024": 3.0,
    "dpo_speedup_vs_trl_2048": 3.0,
    "dpo_memory_vs_trl_2048": 0.5,
    "mfu_full_2048": 0.40,
    "mfu_lora_2048": 0.60,
    "mfu_lora_emb_2048": 0.45,
    "mfu_qwen-1.8b_lora_2048": 0.55,
    "preprocess_uncached_seconds": 2.0,
    "preprocess_cached_seconds": 0.5,
}
LOWER_IS_BETTER = ("memory", "preprocess", "dpo_memory")


def output_layer_work(config: BenchConfig) -> OutputLayerWork:
    if config.trainer == "trl":
        return TRL_CPU_LOSS
    if config.stage == "dpo":
        return CHECKPOINTED_LOSS
    return ORIGINAL_LOSS if config.is_baseline else FUSED_LOSS


def derive(raw: dict[str, Any], peak_flops: float) -> dict[str, Any]:
    """Per-configuration figures over the measured micro-batches.

    The baseline's step time does not depend on which samples it holds (every row has model_max_length
    positions), so its non-padding share is taken from the whole dataset rather than from the few measured
    samples: effective tokens/s = positions/s x (dataset tokens / (samples x model_max_length)). This
    removes sampling noise without favouring either side; the directly counted figure is kept as
    `effective_tokens_per_second_counted`.
    """
    config = BenchConfig(**raw["config"])
    tokens = StepTokens(**raw["tokens"])
    shape = ModelShape.from_config(raw["model_dimensions"])
    seconds = raw["seconds"]
    counted = tokens.real_tokens / seconds
    if config.is_baseline:
        slots = raw["data"]["samples_kept"] * config.max_length
        real_share = raw["data"]["total_tokens"] / slots
        effective = tokens.padded_tokens / seconds * real_share
        supervised = tokens.padded_tokens / seconds * raw["data"]["supervised_tokens"] / slots
        padding = 1 - real_share
        scale = effective / counted  # model FLOPs are linear in the token counts
    else:
        effective, supervised = counted, tokens.supervised / seconds
        padding = 1 - tokens.real_tokens / tokens.padded_tokens
        scale = 1.0
    dpo = config.stage == "dpo"
    useful = model_flops(shape, config.mode, raw["lora_rank"], tokens, reference_forward=dpo) * scale
    executed = executed_flops(
        shape,
        config.mode,
        raw["lora_rank"],
        tokens,
        output_layer_work(config),
        packed=config.batching in ("packed", "packed_pairs"),
        checkpointing=config.checkpointing,
        reference_forward=dpo,
    )
    return {
        "name": config.name,
        "checkpointing": config.checkpointing,
        "trainer": config.trainer,
        "stage": config.stage,
        "model": config.model,
        "mode": config.mode,
        "batching": config.batching,
        "max_length": config.max_length,
        "optimizer_steps": config.steps,
        "measured_micro_batches": raw["measured_micro_batches"],
        "seconds": seconds,
        "wall_seconds": raw["wall_seconds"],
        "measured_real_tokens": tokens.real_tokens,
        "effective_tokens_per_second": effective,
        "effective_tokens_per_second_counted": counted,
        "supervised_tokens_per_second": supervised,
        "padding_fraction": padding,
        "peak_rss_bytes": raw["peak_rss_bytes"],
        "rss_after_load_bytes": raw["rss_after_load_bytes"],
        "planned_peak_bytes": raw.get("planned_peak_bytes"),
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


def _find(
    rows: list[dict[str, Any]],
    mode: str,
    batching: str,
    length: int,
    trainer: str = "toolkit",
    model: str = SMALL_MODEL,
) -> dict[str, Any] | None:
    for row in rows:
        key = (row["trainer"], row["model"], row["mode"], row["batching"], row["max_length"])
        if key == (trainer, model, mode, batching, length):
            return row
    return None


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Each small-model toolkit row's throughput and peak memory relative to the baseline and to TRL at
    the same length (the references are LoRA runs: SFTTrainer on packed rows, or DPOTrainer for DPO)."""
    for row in rows:
        if row["model"] != SMALL_MODEL or row["trainer"] != "toolkit":
            continue
        length = row["max_length"]
        references: tuple[tuple[str, dict[str, Any] | None], ...]
        if row["stage"] == "dpo":
            references = (("trl", _find(rows, "lora", "pairs", length, trainer="trl")),)
        else:
            references = (
                ("baseline", _find(rows, "lora", "padded", length)),
                ("trl", _find(rows, "lora", "packed", length, trainer="trl")),
            )
        for name, reference in references:
            if reference is None:
                continue
            row[f"speedup_vs_{name}"] = (
                row["effective_tokens_per_second"] / reference["effective_tokens_per_second"]
            )
            row[f"memory_vs_{name}"] = row["peak_rss_bytes"] / reference["peak_rss_bytes"]


def evaluate_targets(
    rows: list[dict[str, Any]], preprocessing: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """One entry per target that this run measured: value, threshold, met, and the configuration used."""
    results = []

    def add(target: str, description: str, value: float, source: str) -> None:
        threshold = TARGETS[target]
        lower = target.startswith(LOWER_IS_BETTER)
        results.append(
            {
                "target": target,
                "description": description,
                "value": value,
                "threshold": threshold,
                "met": value <= threshold if lower else value >= threshold,
                "source": source,
            }
        )

    for reference, label in (("baseline", "baseline"), ("trl", "TRL SFTTrainer")):
        for length in (512, 2048):
            target = f"speedup_{length}" if reference == "baseline" else f"speedup_vs_trl_{length}"
            for batching in ("grouped", "packed"):
                row = _find(rows, "lora", batching, length)
                if row and f"speedup_vs_{reference}" in row:
                    add(
                        target,
                        f"LoRA effective tokens/s vs {label} at {length} ({BATCHING_LABELS[batching]})",
                        row[f"speedup_vs_{reference}"],
                        row["name"],
                    )
        target = "memory_ratio_2048" if reference == "baseline" else "memory_vs_trl_2048"
        for batching in ("grouped", "packed"):
            row = _find(rows, "lora", batching, 2048)
            if row and f"memory_vs_{reference}" in row:
                add(
                    target,
                    f"LoRA peak RSS vs {label} at 2048 ({BATCHING_LABELS[batching]})",
                    row[f"memory_vs_{reference}"],
                    row["name"],
                )
    for length in (1024, 2048):
        for batching in ("pairs", "packed_pairs"):
            row = _find(rows, "lora", batching, length)
            if row is None or row["stage"] != "dpo" or "speedup_vs_trl" not in row:
                continue
            add(
                f"dpo_speedup_vs_trl_{length}",
                f"DPO LoRA effective tokens/s vs TRL DPOTrainer at {length} ({BATCHING_LABELS[batching]})",
                row["speedup_vs_trl"],
                row["name"],
            )
            if length == 2048:
                add(
                    "dpo_memory_vs_trl_2048",
                    f"DPO LoRA peak RSS vs TRL DPOTrainer at 2048 ({BATCHING_LABELS[batching]})",
                    row["memory_vs_trl"],
                    row["name"],
                )
    for target, mode, model in (
        ("mfu_full_2048", "full", SMALL_MODEL),
        ("mfu_lora_2048", "lora", SMALL_MODEL),
        ("mfu_lora_emb_2048", "lora_emb", SMALL_MODEL),
        ("mfu_qwen-1.8b_lora_2048", "lora", "qwen-1.8b"),
    ):
        row = _find(rows, mode, "packed", 2048, model=model)
        if row:
            add(target, f"MFU of {MODE_LABELS[mode]} on `{model}` at 2048 (packing)", row["mfu"], row["name"])
    if preprocessing:
        add(
            "preprocess_uncached_seconds",
            f"tokenise {preprocessing['samples']} alpaca_en conversations, {preprocessing['workers']} workers, "
            "after warm-up (s)",
            preprocessing["uncached_seconds"],
            "bench/preprocess.py",
        )
        add(
            "preprocess_cached_seconds",
            "same, second run from the cache (s)",
            preprocessing["cached_seconds"],
            "bench/preprocess.py",
        )
    return results


def _ratio(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.2f}x" if key in row else "-"


def _who(row: dict[str, Any]) -> str:
    if row["trainer"] == "trl" and row["stage"] == "dpo":
        return "TRL DPOTrainer"
    return TRAINER_LABELS[row["trainer"]]


def results_table(rows: list[dict[str, Any]]) -> str:
    header = (
        "| max len | trainer | mode | batching | steps (measured micro-batches) | measured real tokens | "
        "effective tok/s | supervised tok/s | padding | peak RSS GiB | MFU | executed | vs baseline tok/s | "
        "vs baseline RSS | vs TRL tok/s | vs TRL RSS | loss |\n"
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [header]
    for row in rows:
        lines.append(
            f"| {row['max_length']} | {_who(row)} | {MODE_LABELS[row['mode']]} | {row['batching']} | "
            f"{row['optimizer_steps']} ({row['measured_micro_batches']}) | {row['measured_real_tokens']} | "
            f"{row['effective_tokens_per_second']:.1f} | "
            f"{row['supervised_tokens_per_second']:.1f} | {100 * row['padding_fraction']:.1f}% | "
            f"{row['peak_rss_bytes'] / GIB:.2f} | {100 * row['mfu']:.1f}% | "
            f"{100 * row['executed_utilisation']:.1f}% | {_ratio(row, 'speedup_vs_baseline')} | "
            f"{_ratio(row, 'memory_vs_baseline')} | {_ratio(row, 'speedup_vs_trl')} | "
            f"{_ratio(row, 'memory_vs_trl')} | {row['train_loss']:.3f} |"
        )
    return "\n".join(lines)


def real_shapes_table(rows: list[dict[str, Any]], skipped: list[dict[str, Any]]) -> str:
    lines = [
        "| model | mode | max len | activation checkpointing | measured micro-batches | measured real tokens | "
        "effective tok/s | supervised tok/s | peak RSS GiB | planned peak GiB | MFU | executed | loss | "
        "time taken (s) |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        planned = row.get("planned_peak_bytes")
        lines.append(
            f"| {row['model']} | {MODE_LABELS[row['mode']]} | {row['max_length']} | "
            f"{'yes' if row['checkpointing'] else 'no'} | "
            f"{row['measured_micro_batches']} | {row['measured_real_tokens']} | "
            f"{row['effective_tokens_per_second']:.1f} | {row['supervised_tokens_per_second']:.1f} | "
            f"{row['peak_rss_bytes'] / GIB:.2f} | {planned / GIB if planned else float('nan'):.2f} | "
            f"{100 * row['mfu']:.1f}% | {100 * row['executed_utilisation']:.1f}% | {row['train_loss']:.3f} | "
            f"{row['wall_seconds']:.0f} |"
        )
    for entry in skipped:
        lines.append(
            f"| {entry['model']} | {MODE_LABELS[entry['mode']]} | {entry['max_length']} | | not run: "
            f"{entry['reason']} | | | | | {entry['planned_peak_bytes'] / GIB:.2f} | | | | |"
        )
    return "\n".join(lines)


def targets_table(targets: list[dict[str, Any]]) -> str:
    lines = ["| target | measured | threshold | met | configuration |", "|---|---:|---:|---|---|"]
    for entry in targets:
        kind = "<=" if entry["target"].startswith(LOWER_IS_BETTER) else ">="
        mfu = entry["target"].startswith("mfu")
        shown = f"{100 * entry['value']:.1f}%" if mfu else f"{entry['value']:.2f}"
        threshold = f"{100 * entry['threshold']:.0f}%" if mfu else f"{entry['threshold']}"
        lines.append(
            f"| {entry['description']} | {shown} | {kind} {threshold} | {'yes' if entry['met'] else '**no**'} | "
            f"{entry['source']} |"
        )
    return "\n".join(lines)


def startup_lines(startup: dict[str, Any]) -> list[str]:
    return [
        "## Start-up",
        "",
        f"`python finetune.py --help`: {startup['help_seconds_min']:.2f} s (median "
        f"{startup['help_seconds_median']:.2f} s). From the command to the first logged training step of a "
        f"tiny LoRA run (bench/startup.py): {startup['first_step_seconds_min']:.2f} s (median "
        f"{startup['first_step_seconds_median']:.2f} s).",
        "",
    ]


def markdown(summary: dict[str, Any]) -> str:
    """RESULTS.md: the run's conditions, the targets, the per-configuration tables."""
    peak = summary["matmul_peak"]
    machine = summary["machine"]
    small = [row for row in summary["rows"] if row["model"] == SMALL_MODEL and row["stage"] == "sft"]
    preference = [row for row in summary["rows"] if row["stage"] == "dpo"]
    real = [row for row in summary["rows"] if row["model"] != SMALL_MODEL]
    lines = [
        "# Benchmark results",
        "",
        f"Command: `{summary['command']}` ({summary['wall_seconds'] / 60:.0f} minutes)",
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
        "## Per configuration (`small`)",
        "",
        results_table(small),
        "",
    ]
    if preference:
        lines += [
            "## DPO (`small`, LoRA, sigmoid loss, beta 0.1, reference: the adapter switched off)",
            "",
            results_table(preference),
            "",
        ]
    if real or summary.get("skipped"):
        lines += [
            "## Released shapes (random weights)",
            "",
            real_shapes_table(real, summary.get("skipped", [])),
            "",
        ]
    if summary.get("startup"):
        lines += startup_lines(summary["startup"])
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

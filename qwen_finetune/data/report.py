"""The data report: what the pipeline did to the data and what each batching mode would cost.

For preference pairs the report counts pairs (read, kept, skipped by reason, prompts shortened) and
their prompt / chosen / rejected tokens; `length` is then the longer sequence of each pair, and there
is no padding simulation (a batch holds both sequences of every pair).

Padding efficiency = real tokens / tokens the model computes (real + padding), for the batch size
given, simulated on the actual lengths: `pad_to_max` pads every row to model_max_length (the
original); `dynamic` pads each batch to its longest row, in random order as the trainer shuffles;
`grouped` does the same after the trainer's length grouping (transformers' own function); `packed` packs
samples into rows of model_max_length (with `--pad_to_max_length` too, packed rows are padded fully).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.trainer_pt_utils import get_length_grouped_indices

from . import chatml, pairs
from .packing import pack_lengths

REPORT_FILE = "data_stats.json"
SIMULATION_SEED = 0
EXAMPLE_IDS = 5
SKIP_REASONS = {**chatml.SKIP_REASONS, **pairs.SKIP_REASONS}


@dataclass
class SplitColumns:
    """Per-sample columns of one split (all samples read, skipped ones included). `token_counts` are
    summed into the report under their names (total_tokens, supervised_tokens, ...)."""

    ids: list[str]
    lengths: np.ndarray
    truncated: np.ndarray
    skip_reasons: list[str]
    token_counts: dict[str, np.ndarray]

    def take(self, rows: np.ndarray) -> SplitColumns:
        return SplitColumns(
            ids=[self.ids[row] for row in rows],
            lengths=self.lengths[rows],
            truncated=self.truncated[rows],
            skip_reasons=[self.skip_reasons[row] for row in rows],
            token_counts={name: counts[rows] for name, counts in self.token_counts.items()},
        )

    def kept_mask(self) -> np.ndarray:
        return np.array([not reason for reason in self.skip_reasons], dtype=bool)


def _batched_cost(lengths: np.ndarray, batch_size: int) -> int:
    """Tokens computed when consecutive rows are batched and padded to the batch's longest row."""
    cost = 0
    for start in range(0, len(lengths), batch_size):
        batch = lengths[start : start + batch_size]
        cost += int(batch.max()) * len(batch)
    return cost


def padding_efficiency(
    lengths: np.ndarray, batch_size: int, max_length: int, pad_to_max_length: bool
) -> dict[str, Any]:
    total = int(lengths.sum())
    if total == 0:
        return {}
    generator = np.random.default_rng(SIMULATION_SEED)
    shuffled = lengths[generator.permutation(len(lengths))]
    grouped_order = get_length_grouped_indices(
        lengths.tolist(), batch_size, generator=torch.Generator().manual_seed(SIMULATION_SEED)
    )
    rows = pack_lengths(lengths.tolist(), max_length)
    row_lengths = np.array([int(lengths[row].sum()) for row in rows])
    packed_cost = (
        len(rows) * max_length
        if pad_to_max_length
        else _batched_cost(row_lengths[generator.permutation(len(rows))], batch_size)
    )
    return {
        "batch_size": batch_size,
        "pad_to_max": round(total / (len(lengths) * max_length), 4),
        "dynamic": round(total / _batched_cost(shuffled, batch_size), 4),
        "grouped": round(total / _batched_cost(lengths[grouped_order], batch_size), 4),
        "packed": round(total / packed_cost, 4),
        "packed_rows": len(rows),
    }


def split_report(
    columns: SplitColumns,
    *,
    batch_size: int,
    max_length: int,
    pad_to_max_length: bool,
    token_stats: bool = True,
    padding_stats: bool = True,
) -> dict[str, Any]:
    kept = columns.kept_mask()
    reasons = Counter(reason for reason in columns.skip_reasons if reason)
    skipped = {
        reason: {
            "count": count,
            "why": SKIP_REASONS.get(reason, reason),
            "example_ids": [
                sample_id for sample_id, r in zip(columns.ids, columns.skip_reasons) if r == reason
            ][:EXAMPLE_IDS],
        }
        for reason, count in sorted(reasons.items())
    }
    report: dict[str, Any] = {
        "samples_read": len(columns.ids),
        "samples_kept": int(kept.sum()),
        "samples_skipped": int((~kept).sum()),
        "skipped": skipped,
    }
    if not token_stats:
        return report
    lengths = columns.lengths[kept]
    report["truncated"] = int(columns.truncated[kept].sum())
    for name, counts in columns.token_counts.items():
        report[name] = int(counts[kept].sum())
    if len(lengths):
        percentiles = np.percentile(lengths, [50, 90, 95, 99])
        report["length"] = {
            "min": int(lengths.min()),
            "mean": round(float(lengths.mean()), 1),
            "p50": float(percentiles[0]),
            "p90": float(percentiles[1]),
            "p95": float(percentiles[2]),
            "p99": float(percentiles[3]),
            "max": int(lengths.max()),
        }
        if padding_stats:
            report["padding_efficiency"] = padding_efficiency(
                lengths, batch_size, max_length, pad_to_max_length
            )
    return report


def batching_mode(packing: bool, pad_to_max_length: bool) -> str:
    if packing:
        return "packed"
    return "pad_to_max" if pad_to_max_length else "dynamic"


def format_report(report: dict[str, Any]) -> str:
    settings = report["settings"]
    pairs = settings.get("kind") == "preference"  # reports written before pairs existed have no kind
    labels = "preference pairs" if pairs else f"label_policy {settings['label_policy']}"
    unit = "pairs" if pairs else "samples"
    lines = [
        f"Data report (model_max_length {settings['model_max_length']}, {labels}, "
        f"truncation {settings['truncation']}, batching {settings['batching']})"
    ]
    for file in report["files"]:
        dropped = file["leading_turns_dropped"]
        note = f", {dropped} leading non-user turns dropped" if dropped else ""
        lines.append(f"  file {file['path']}: {file['format']}, {file['samples']} {unit}{note}")
    for split in ("train", "eval"):
        stats = report.get(split)
        if not stats:
            continue
        lines.append(
            f"  {split}: {stats['samples_read']} {unit} read, {stats['samples_kept']} kept, "
            f"{stats['samples_skipped']} skipped"
            + (
                f", {stats['truncated']} {'with a shortened prompt' if pairs else 'truncated'}"
                if "truncated" in stats
                else ""
            )
        )
        for reason, detail in stats["skipped"].items():
            lines.append(
                f"    skipped {reason}: {detail['count']} ({detail['why']}), e.g. {detail['example_ids']}"
            )
        counts = [
            f"{stats[name]} {name.removesuffix('_tokens')}" for name in stats if name.endswith("_tokens")
        ]
        if counts:
            lines.append("    tokens: " + ", ".join(counts))
        if "length" in stats:
            length = stats["length"]
            lines.append(
                "    length: "
                + ", ".join(
                    f"{name} {length[name]:g}" for name in ("min", "mean", "p50", "p90", "p99", "max")
                )
            )
        efficiency = stats.get("padding_efficiency")
        if efficiency:
            chosen = settings["batching"]
            modes = []
            for mode in ("pad_to_max", "dynamic", "grouped", "packed"):
                marker = " <- this run" if mode == chosen else ""
                modes.append(f"{mode} {efficiency[mode]:.1%}{marker}")
            lines.append(
                f"    padding efficiency (batch size {efficiency['batch_size']}): " + ", ".join(modes)
            )
        if "note" in stats:
            lines.append(f"    {stats['note']}")
    return "\n".join(lines)


def write_report(report: dict[str, Any], output_dir: str | os.PathLike) -> Path:
    """data_stats.json in `output_dir`, written to a temporary file and renamed into place."""
    directory = Path(output_dir)
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / REPORT_FILE
    handle, temporary = tempfile.mkstemp(prefix=f".{REPORT_FILE}-", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(report, file, indent=2, ensure_ascii=False)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


def files_section(files: list[Any]) -> list[dict[str, Any]]:
    return [asdict(item) for item in files]

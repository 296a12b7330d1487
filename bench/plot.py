"""The benchmark's figure: effective tokens/s and peak RSS against model_max_length, one line per run kind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from configs import MODE_LABELS  # noqa: E402
from matplotlib import ticker  # noqa: E402

GIB = 2**30
BATCHING_STYLE = {"padded": ("--", "s"), "grouped": (":", "^"), "packed": ("-", "o")}


def _series(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        series.setdefault((row["mode"], row["batching"]), []).append(row)
    return {key: sorted(value, key=lambda row: row["max_length"]) for key, value in series.items()}


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(13, 5.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    modes = sorted({row["mode"] for row in rows}, key=list(MODE_LABELS).index)
    for (mode, batching), points in _series(rows).items():
        line_style, marker = BATCHING_STYLE[batching]
        label = f"{MODE_LABELS[mode]}, {'baseline (pad to max, full logits)' if batching == 'padded' else batching}"
        colour = "black" if batching == "padded" else colours[modes.index(mode) % len(colours)]
        lengths = [row["max_length"] for row in points]
        speed.plot(
            lengths,
            [row["effective_tokens_per_second"] for row in points],
            line_style,
            marker=marker,
            color=colour,
            label=label,
        )
        memory.plot(
            lengths,
            [row["peak_rss_bytes"] / GIB for row in points],
            line_style,
            marker=marker,
            color=colour,
            label=label,
        )
    lengths = sorted({row["max_length"] for row in rows})
    for axis, ylabel in (
        (speed, "effective (non-padding) tokens / s"),
        (memory, "peak RSS of the process (GiB)"),
    ):
        axis.set_xscale("log", base=2)
        axis.set_xticks(lengths, [str(length) for length in lengths])
        axis.set_xlabel("model_max_length")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
    speed.set_yscale("log")
    speed.yaxis.set_major_formatter(ticker.ScalarFormatter())
    speed.yaxis.set_minor_formatter(ticker.ScalarFormatter())
    speed.set_title("Throughput (log scale)")
    memory.set_title("Peak memory")
    memory.set_ylim(bottom=0)
    handles, labels = speed.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=9, frameon=False)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout(rect=(0, 0.13, 1, 0.95))
    figure.savefig(path, dpi=110)
    plt.close(figure)

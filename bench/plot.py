"""The benchmark's figure: effective tokens/s and peak RSS against model_max_length (one line per kind of
supervised run on the small model, the baseline and TRL's SFTTrainer included), and the MFU of every
run (DPO and the released shapes too)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from configs import MODE_LABELS, SMALL_MODEL, TRAINER_LABELS  # noqa: E402
from matplotlib import ticker  # noqa: E402

GIB = 2**30
BATCHING_STYLE = {"padded": ("--", "s"), "grouped": (":", "^"), "packed": ("-", "o")}
TRL_STYLE = ("-.", "D")
REFERENCE_COLOURS = {"padded": "black", "trl": "tab:gray"}


def _label(trainer: str, mode: str, batching: str) -> str:
    if trainer != "toolkit":
        return f"{TRAINER_LABELS[trainer]}, {MODE_LABELS[mode]}, {batching}"
    kind = "baseline (pad to max, full logits)" if batching == "padded" else batching
    return f"{MODE_LABELS[mode]}, {kind}"


def _series(rows: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    series: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for row in rows:
        if row["model"] == SMALL_MODEL and row["stage"] == "sft":
            series.setdefault((row["trainer"], row["mode"], row["batching"]), []).append(row)
    return {key: sorted(value, key=lambda row: row["max_length"]) for key, value in series.items()}


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    figure, (speed, memory, utilisation) = plt.subplots(
        1, 3, figsize=(19, 5.6), gridspec_kw={"width_ratios": [1, 1, 1.2]}
    )
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    modes = sorted({row["mode"] for row in rows}, key=list(MODE_LABELS).index)
    for (trainer, mode, batching), points in _series(rows).items():
        line_style, marker = TRL_STYLE if trainer != "toolkit" else BATCHING_STYLE[batching]
        colour = REFERENCE_COLOURS.get(trainer if trainer != "toolkit" else batching)
        colour = colour or colours[modes.index(mode) % len(colours)]
        lengths = [row["max_length"] for row in points]
        label = _label(trainer, mode, batching)
        for axis, values in (
            (speed, [row["effective_tokens_per_second"] for row in points]),
            (memory, [row["peak_rss_bytes"] / GIB for row in points]),
        ):
            axis.plot(lengths, values, line_style, marker=marker, color=colour, label=label)
    lengths = sorted(
        {row["max_length"] for row in rows if row["model"] == SMALL_MODEL and row["stage"] == "sft"}
    )
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
    speed.set_title("Throughput, small model (log scale)")
    memory.set_title("Peak memory, small model")
    memory.set_ylim(bottom=0)

    names = [row["name"] for row in rows]
    bar_colours = [
        REFERENCE_COLOURS["trl"]
        if row["trainer"] != "toolkit"
        else REFERENCE_COLOURS["padded"]
        if row["batching"] == "padded"
        else colours[modes.index(row["mode"]) % len(colours)]
        for row in rows
    ]
    utilisation.barh(names, [100 * row["mfu"] for row in rows], color=bar_colours)
    utilisation.invert_yaxis()
    utilisation.tick_params(axis="y", labelsize=7)
    utilisation.set_xlabel("MFU (% of the measured float32 matmul peak)")
    utilisation.set_title("MFU of every run")
    utilisation.grid(True, axis="x", alpha=0.3)

    handles, labels = speed.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=4, fontsize=9, frameon=False)
    figure.suptitle(title, fontsize=11)
    figure.tight_layout(rect=(0, 0.12, 1, 0.95))
    figure.savefig(path, dpi=110)
    plt.close(figure)

"""The logged series the report plots, taken from trainer_state.json's log_history.

A series is one logged key over the steps that logged it. The plots, and `series.json` beside their
PNG files, hold exactly these values (memory is drawn in GiB, `scale` says by how much it was divided).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from .logged_values import PEAK_MEMORY_KEY

EVAL_LOSS_KEY = re.compile(r"^eval(_.+)?_loss$")  # eval_loss, or eval_NAME_loss with several eval sets


@dataclass(frozen=True)
class Series:
    label: str
    key: str  # the log_history key
    steps: list[int]
    values: list[float]  # as logged


@dataclass(frozen=True)
class Plot:
    name: str  # file name stem of the PNG
    title: str
    ylabel: str
    series: list[Series]
    scale: float = 1.0  # values are drawn divided by this


@dataclass(frozen=True)
class PlotSpec:
    name: str
    title: str
    ylabel: str
    keys: list[tuple[str, str]] = field(default_factory=list)  # (label, log key)
    scale: float = 1.0


PLOT_SPECS = (
    PlotSpec("loss", "Loss", "loss (nats per token)", [("train loss", "loss")]),
    PlotSpec("learning_rate", "Learning rate", "learning rate", [("learning rate", "learning_rate")]),
    PlotSpec(
        "grad_norm", "Gradient norm", "gradient norm (before clipping)", [("gradient norm", "grad_norm")]
    ),
    PlotSpec(
        "tokens_per_second", "Throughput", "tokens/s (all processes)", [("tokens/s", "tokens_per_second")]
    ),
    PlotSpec(
        "memory", "Peak memory", "GiB (max over processes)", [("peak memory", PEAK_MEMORY_KEY)], scale=2.0**30
    ),
    # preference training (--stage dpo) only: the other runs log none of these keys
    PlotSpec(
        "rewards",
        "Preference rewards",
        "reward (beta x log-prob ratio)",
        [
            ("chosen", "rewards/chosen"),
            ("rejected", "rewards/rejected"),
            ("margin", "rewards/margins"),
            ("eval margin", "eval_rewards/margins"),
        ],
    ),
    PlotSpec(
        "reward_accuracy",
        "Reward accuracy",
        "pairs whose chosen answer has the higher reward",
        [("train", "rewards/accuracies"), ("eval", "eval_rewards/accuracies")],
    ),
)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def series_of(log_history: list[dict[str, Any]], key: str, label: str) -> Series:
    steps, values = [], []
    for entry in log_history:
        if is_number(entry.get(key)) and "step" in entry:
            steps.append(int(entry["step"]))
            values.append(float(entry[key]))
    return Series(label, key, steps, values)


def eval_loss_keys(log_history: list[dict[str, Any]]) -> list[str]:
    return sorted({key for entry in log_history for key in entry if EVAL_LOSS_KEY.match(key)})


def plots_of(log_history: list[dict[str, Any]]) -> list[Plot]:
    """Every plot that has data; the loss plot also gets one series per eval loss."""
    plots = []
    for spec in PLOT_SPECS:
        keys = list(spec.keys)
        if spec.name == "loss":
            keys += [(key.replace("_", " "), key) for key in eval_loss_keys(log_history)]
        series = [series_of(log_history, key, label) for label, key in keys]
        series = [item for item in series if item.steps]
        if series:
            plots.append(Plot(spec.name, spec.title, spec.ylabel, series, spec.scale))
    return plots


def series_json(plots: list[Plot]) -> dict[str, Any]:
    """series.json: per plot, its scale and each series' key, steps and logged values."""
    return {
        plot.name: {
            "title": plot.title,
            "scale": plot.scale,
            "series": {
                item.label: {"key": item.key, "steps": item.steps, "values": item.values}
                for item in plot.series
            },
        }
        for plot in plots
    }

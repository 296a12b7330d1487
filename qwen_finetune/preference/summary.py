"""The preference part of a run's summary (train_summary.json and the printed summary): the loss and
its settings, where the reference came from, and the metrics of the first and last training log and
of the last evaluation, read from the trainer's log history."""

from __future__ import annotations

from typing import Any

from .args import PreferenceArguments
from .loss import metric_names
from .reference import ReferenceKind, describe_reference


def _logged(entry: dict[str, Any] | None, names: tuple[str, ...], prefix: str = "") -> dict[str, Any] | None:
    if entry is None:
        return None
    return {"step": entry.get("step"), **{name: entry[prefix + name] for name in ("loss", *names)}}


def preference_summary(
    log_history: list[dict[str, Any]], config: PreferenceArguments, reference: ReferenceKind
) -> dict[str, Any]:
    names = metric_names(config)
    training = [entry for entry in log_history if names[0] in entry and "loss" in entry]
    evaluations = [entry for entry in log_history if f"eval_{names[0]}" in entry]
    return {
        "loss": config.pref_loss,
        "beta": config.pref_beta,
        "label_smoothing": config.pref_label_smoothing,
        "simpo_gamma": config.simpo_gamma if config.pref_loss == "simpo" else None,
        "ftx": config.pref_ftx,
        "reference": reference,
        "first_log": _logged(training[0] if training else None, names),
        "last_log": _logged(training[-1] if training else None, names),
        "last_eval": _logged(evaluations[-1] if evaluations else None, names, "eval_"),
    }


def format_preference_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"  preference loss        {summary['loss']} (beta {summary['beta']})",
        f"  reference              {describe_reference(summary['reference'])}",
    ]
    for label, key in (("first log", "first_log"), ("last log", "last_log"), ("last eval", "last_eval")):
        entry = summary[key]
        if entry is not None:
            lines.append(
                f"  {label:<22} step {entry['step']}: reward accuracy {entry['rewards/accuracies']:.3f}, "
                f"margin {entry['rewards/margins']:.4f} (chosen {entry['rewards/chosen']:.4f}, "
                f"rejected {entry['rewards/rejected']:.4f})"
            )
    return "\n".join(lines)

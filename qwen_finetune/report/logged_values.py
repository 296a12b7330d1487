"""Values the toolkit adds to the trainer's logs, so that trainer_state.json, TensorBoard (and any
other --report_to) and the run report all carry them: the peak memory at every training log and the
perplexity at every evaluation."""

from __future__ import annotations

import math
from typing import Any

from transformers import Trainer

PEAK_MEMORY_KEY = "peak_memory_bytes"
LARGEST_EXPONENT = math.log(1e300)  # exp() of a larger loss is not a number a plot or a reader can use


def perplexities(logs: dict[str, Any]) -> dict[str, float]:
    """eval_loss -> eval_perplexity (and eval_NAME_loss -> eval_NAME_perplexity for several eval sets)."""
    values = {}
    for key, loss in logs.items():
        numeric = isinstance(loss, (int, float))
        if key.startswith("eval") and key.endswith("_loss") and numeric and loss < LARGEST_EXPONENT:
            values[key[: -len("loss")] + "perplexity"] = math.exp(loss)
    return values


def extra_log_values(trainer: Trainer, logs: dict[str, Any]) -> dict[str, float]:
    """What to add to `logs` before the trainer records them. Collective at training logs (every
    process logs at the same steps, as for the token counts)."""
    values: dict[str, float] = dict(perplexities(logs))
    if "loss" in logs:
        # here: run_metrics loads the model code, which the report command does not need
        from qwen_finetune.run_metrics import peak_memory_over_processes

        values[PEAK_MEMORY_KEY] = peak_memory_over_processes(trainer)
    return values

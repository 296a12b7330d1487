"""Helpers shared by test_sample_answers.py and test_report.py: prompts, the answers a run wrote, and the
flags of a few evaluated steps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import train_helpers as helpers

QUESTIONS = ["What colour is the sky?", "Name a fruit.", "What do cows say?"]


def write_questions(path: Path) -> Path:
    path.write_text("\n".join(QUESTIONS) + "\n", encoding="utf-8")
    return path


def sample_records(output_dir: Path) -> list[dict[str, Any]]:
    lines = (output_dir / "sample_answers.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def flags(
    model: Path,
    data: Path,
    output: Path,
    cache_dir: Path,
    *,
    steps: int,
    eval_steps: int,
    method: str = "lora",
    processes: int = 1,
    extra: list[str] | None = None,
) -> list[str]:
    """A few deterministic steps (train_helpers.training_flags) evaluated every `eval_steps`."""
    return [
        *helpers.training_flags(
            model,
            data,
            output,
            steps=steps,
            learning_rate=helpers.LEARNING_RATE[method],
            processes=processes,
            cache_dir=cache_dir,
            extra=helpers.METHOD_FLAGS[method],
        ),
        "--eval_steps",
        str(eval_steps),
        *(extra or []),
    ]

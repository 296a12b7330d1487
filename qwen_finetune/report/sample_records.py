"""sample_answers.jsonl: what the model answered at each evaluation, one JSON object per prompt and
evaluation, kept in the output directory so the report can be rebuilt after the run."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from qwen_finetune.errors import InputFileError

from .files import write_atomically

SAMPLES_FILE = "sample_answers.jsonl"


@dataclass(frozen=True)
class SampleAnswerRecord:
    step: int  # the global step the model had reached
    epoch: float | None
    index: int  # the prompt's position in the run's list of prompts
    id: str
    question: str  # the prompt's last user turn
    prompt: str  # the whole prompt, as ChatML text
    reference: str | None  # the expected answer, when the prompt came with one
    answer: str
    new_tokens: int
    stopped: bool  # False: cut at --sample_max_new_tokens


FIELDS = tuple(item.name for item in fields(SampleAnswerRecord))


def read_sample_answers(path: Path) -> list[SampleAnswerRecord]:
    """The records of `path` in file order; an empty list when the run wrote none."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputFileError(f"{path} line {number} is not valid JSON: {error.msg}") from None
        if not isinstance(value, dict) or set(value) != set(FIELDS):
            raise InputFileError(
                f"{path} line {number} is not a sample answer record with the fields {FIELDS}"
            )
        records.append(SampleAnswerRecord(**value))
    return records


def write_sample_answers(path: Path, records: Sequence[SampleAnswerRecord]) -> None:
    """Replace `path` with `records` (the whole file each time: a kill never leaves a torn line)."""
    text = "".join(json.dumps(asdict(record), ensure_ascii=False) + "\n" for record in records)
    write_atomically(path, text)

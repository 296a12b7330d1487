"""What a run saved in its output directory, read back for the report: finished, resumed or killed.

The history comes from one trainer_state.json, the newest one written: the output directory's (the
run finished) or its newest checkpoint-N's (the run is going on, or was killed). A resumed run
continues the history of the checkpoint it resumed from, so that file holds every step once.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_finetune.checkpoint_info import MEMORY_PLAN_FILE, TRAIN_SUMMARY_FILE
from qwen_finetune.data.report import REPORT_FILE as DATA_REPORT_FILE
from qwen_finetune.errors import InputFileError
from qwen_finetune.json_files import read_json

from .run_info import RUN_INFO_FILE
from .sample_records import SAMPLES_FILE, SampleAnswerRecord, read_sample_answers

STATE_FILE = "trainer_state.json"  # transformers' name, in the output dir and in every checkpoint
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class SavedRun:
    output_dir: Path
    state_file: Path
    state: dict[
        str, Any
    ]  # trainer_state.json: log_history, global_step, max_steps, best_model_checkpoint, ...
    finished: bool  # the final state and train_summary.json were written
    summary: dict[str, Any] | None  # train_summary.json, when finished
    data_report: dict[str, Any] | None  # data_stats.json
    memory_plan: dict[str, Any] | None  # memory_plan.json: {"total_bytes": int, "components": {name: bytes}}
    run_info: dict[str, Any] | None  # run_info.json
    samples: list[SampleAnswerRecord]

    @property
    def log_history(self) -> list[dict[str, Any]]:
        return list(self.state.get("log_history", []))

    @property
    def global_step(self) -> int:
        return int(self.state.get("global_step", 0))

    @property
    def max_steps(self) -> int:
        return int(self.state.get("max_steps", 0))


def newest_checkpoint_state(output_dir: Path) -> Path | None:
    """trainer_state.json of the highest checkpoint-N that has one (a save cut short has none)."""
    numbered = []
    for path in output_dir.iterdir():
        match = CHECKPOINT_NAME.match(path.name)
        if match and (path / STATE_FILE).is_file():
            numbered.append((int(match.group(1)), path / STATE_FILE))
    return max(numbered)[1] if numbered else None


def newest_state_file(output_dir: Path) -> Path:
    candidates = [
        path
        for path in (output_dir / STATE_FILE, newest_checkpoint_state(output_dir))
        if path and path.is_file()
    ]
    if not candidates:
        raise InputFileError(
            f"{output_dir} holds no {STATE_FILE}, neither of a finished run nor in a checkpoint-N directory; "
            "give the --output_dir of a training run that logged or saved at least once"
        )
    return max(candidates, key=lambda path: path.stat().st_mtime_ns)


def _optional_json(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.is_file() else None


def read_saved_run(output_dir: str | os.PathLike) -> SavedRun:
    directory = Path(output_dir)
    if not directory.is_dir():
        raise InputFileError(f"{directory} is not a directory; give the --output_dir of a training run")
    state_file = newest_state_file(directory)
    summary = _optional_json(directory / TRAIN_SUMMARY_FILE)
    finished = state_file.parent == directory and summary is not None
    return SavedRun(
        output_dir=directory,
        state_file=state_file,
        state=read_json(state_file),
        finished=finished,
        summary=summary if finished else None,
        data_report=_optional_json(directory / DATA_REPORT_FILE),
        memory_plan=_optional_json(directory / MEMORY_PLAN_FILE),
        run_info=_optional_json(directory / RUN_INFO_FILE),
        samples=read_sample_answers(directory / SAMPLES_FILE),
    )

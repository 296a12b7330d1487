"""The report while the run goes on: the command and versions at the start of every session, and
the whole report again at every checkpoint (main process only)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .build import check_report_dependencies, write_report
from .run_info import record_session, session_info


class ReportCallback(TrainerCallback):
    """Records each session in run_info.json and rewrites report.html after each checkpoint.

    The report of the finished run is written by the caller once train_summary.json exists (after
    `Trainer.train` returns), with `write_report(output_dir)`."""

    def __init__(self) -> None:
        check_report_dependencies()

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            session = session_info(state.global_step, args.world_size, args.device)
            record_session(Path(str(args.output_dir)), session)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            write_report(str(args.output_dir))

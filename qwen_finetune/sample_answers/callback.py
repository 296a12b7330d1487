"""At each evaluation the model answers the sample prompts; the main process writes the answers to
the log, to sample_answers.jsonl in the output directory and, with `--report_to tensorboard`, to
TensorBoard as text. Every process generates (see generation.py: under ZeRO-3 they must)."""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.integrations import TensorBoardCallback

from qwen_finetune.report.sample_records import (
    SAMPLES_FILE,
    SampleAnswerRecord,
    read_sample_answers,
    write_sample_answers,
)
from qwen_finetune.tokenizer_protocol import QwenTokenizerLike

from .generation import GeneratedAnswer, generate_answers
from .prompts import SamplePrompt

LOG_LINE_CHARS = 160


def find_tensorboard(trainer: Trainer) -> TensorBoardCallback | None:
    """The trainer's TensorBoard callback (present with --report_to tensorboard), whose writer the
    answers share, so they land in the same event file as the scalars."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback):
            return callback
    return None


def one_line(text: str, limit: int = LOG_LINE_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def format_answer_line(record: SampleAnswerRecord, max_steps: int) -> str:
    cut = "" if record.stopped else " [cut]"
    return (
        f"step {record.step}/{max_steps} | sample {record.id} | {one_line(record.question, 60)} -> "
        f"{one_line(record.answer)}{cut}"
    )


def tensorboard_tag(record: SampleAnswerRecord) -> str:
    return f"sample_answers/{record.index:02d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', record.id)}"


def _indented(text: str) -> str:
    """Markdown code block (TensorBoard renders text as Markdown): whitespace and symbols kept."""
    return "\n".join("    " + line for line in (text or " ").splitlines() or [" "])


def tensorboard_text(record: SampleAnswerRecord) -> str:
    ending = "stopped" if record.stopped else "cut at the token limit"
    parts = [
        "**question**",
        _indented(record.question),
        f"**answer** ({record.new_tokens} tokens, {ending})",
        _indented(record.answer),
    ]
    if record.reference is not None:
        parts += ["**reference**", _indented(record.reference)]
    return "\n\n".join(parts)


class SampleAnswersCallback(TrainerCallback):
    """Answers `prompts` greedily at each evaluation (`per_device_eval_batch_size` prompts per batch).

    A resumed run keeps the answers of the steps it resumes after and drops those a killed run wrote
    later (the resumed run evaluates those steps again); a new run starts the file afresh."""

    def __init__(
        self,
        prompts: Sequence[SamplePrompt],
        tokenizer: QwenTokenizerLike,
        *,
        max_new_tokens: int,
        tensorboard: TensorBoardCallback | None = None,
    ) -> None:
        self.prompts = list(prompts)
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.tensorboard = tensorboard
        self.records: list[SampleAnswerRecord] | None = None  # main process only

    @staticmethod
    def path(args: TrainingArguments) -> Path:
        return Path(str(args.output_dir)) / SAMPLES_FILE

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero:
            return
        if state.global_step == 0:
            self.records = []
        else:
            earlier = read_sample_answers(self.path(args))
            self.records = [record for record in earlier if record.step <= state.global_step]

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        answers = generate_answers(
            model,
            self.tokenizer,
            [prompt.input_ids for prompt in self.prompts],
            max_new_tokens=self.max_new_tokens,
            batch_size=args.per_device_eval_batch_size,
            device=args.device,
        )
        if not state.is_world_process_zero:
            return
        new = [self._record(state, index, answer) for index, answer in enumerate(answers)]
        if self.records is None:  # an evaluation outside training: add to what is there
            self.records = read_sample_answers(self.path(args))
        self.records += new
        write_sample_answers(self.path(args), self.records)
        for record in new:
            tqdm.write(format_answer_line(record, state.max_steps))
        sys.stdout.flush()
        writer = self.tensorboard.tb_writer if self.tensorboard is not None else None
        if writer is not None:
            for record in new:
                writer.add_text(tensorboard_tag(record), tensorboard_text(record), state.global_step)
            writer.flush()

    def _record(self, state: TrainerState, index: int, answer: GeneratedAnswer) -> SampleAnswerRecord:
        prompt = self.prompts[index]
        return SampleAnswerRecord(
            step=state.global_step,
            epoch=state.epoch,
            index=index,
            id=prompt.id,
            question=prompt.question,
            prompt=prompt.prompt_text,
            reference=prompt.reference,
            answer=answer.text,
            new_tokens=answer.new_tokens,
            stopped=answer.stopped,
        )

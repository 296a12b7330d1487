"""The flags that choose which prompts the model answers at each evaluation, and how long it may talk."""

from __future__ import annotations

from dataclasses import dataclass, field

from qwen_finetune.errors import ArgumentError

DEFAULT_MAX_NEW_TOKENS = 128


@dataclass
class SampleArguments:
    _argument_group_name = "sample answers"

    sample_prompts: str | None = field(
        default=None,
        metadata={
            "help": "At each evaluation the model answers the prompts of this file (greedy), and the answers go "
            "to the log, sample_answers.jsonl, the report and TensorBoard. A .txt file holds one question per "
            "line; a .json/.jsonl file holds a list of questions (strings) or conversations in any training "
            "data format, whose last assistant turn is shown as the reference answer and is not part of the "
            "prompt. Needs evaluations (--eval_strategy steps|epoch)."
        },
    )
    eval_samples: int = field(
        default=0,
        metadata={
            "help": "Also answer the first N samples of the eval set at each evaluation (each sample up to its "
            "last assistant turn, which is shown as the reference answer)."
        },
    )
    sample_max_new_tokens: int = field(
        default=DEFAULT_MAX_NEW_TOKENS,
        metadata={"help": "Longest sample answer, in tokens (an answer cut there is marked as cut)."},
    )

    def __post_init__(self) -> None:
        if self.eval_samples < 0:
            raise ArgumentError(f"--eval_samples {self.eval_samples} must be >= 0")
        if self.sample_max_new_tokens < 1:
            raise ArgumentError(f"--sample_max_new_tokens {self.sample_max_new_tokens} must be >= 1")

    @property
    def requested(self) -> bool:
        return bool(self.sample_prompts) or self.eval_samples > 0

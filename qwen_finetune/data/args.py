"""Every data flag, as one dataclass for `transformers.HfArgumentParser`, and the encoding options
derived from them.

`model_max_length` is not here: it belongs to the training arguments, and the data functions take it
as a parameter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, get_args

from qwen_finetune.errors import ArgumentError
from qwen_model.chat_format import DEFAULT_SYSTEM_PROMPT

from .formats import DATA_FORMATS, DataFormat

LabelPolicy = Literal["qwen", "assistant_only"]
TruncationPolicy = Literal["drop_turns", "cut"]
# What the samples are for: supervised fine-tuning (conversations) or preference training (pairs).
DataKind = Literal["supervised", "preference"]
LABEL_POLICIES: tuple[str, ...] = get_args(LabelPolicy)
TRUNCATION_POLICIES: tuple[str, ...] = get_args(TruncationPolicy)


@dataclass(frozen=True)
class EncodingOptions:
    """Everything that decides how a sample becomes token ids: what the encoders read and what the
    cache key covers. Made by `DataArguments.encoding_options`."""

    kind: DataKind
    max_length: int
    data_format: DataFormat
    system_message: str
    label_policy: LabelPolicy
    truncation: TruncationPolicy
    allow_special: bool

    def __post_init__(self) -> None:
        if self.max_length < 1:
            raise ArgumentError(f"--model_max_length must be positive, got {self.max_length}")


def default_data_cache_dir() -> Path:
    """Shared by all runs on a machine: entries are keyed by content, so reuse is always safe."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache_home) / "qwen_finetune" / "data"


def split_paths(value: str | None) -> list[str]:
    """`a.json,b.jsonl` -> ["a.json", "b.jsonl"]; blanks around commas are ignored."""
    if not value:
        return []
    return [part.strip() for part in value.split(",") if part.strip()]


@dataclass
class DataArguments:
    data_path: str | None = field(
        default=None,
        metadata={"help": "Training data: one or more .json/.jsonl files, comma-separated."},
    )
    eval_data_path: str | None = field(
        default=None,
        metadata={"help": "Evaluation data: one or more .json/.jsonl files, comma-separated."},
    )
    eval_split_ratio: float = field(
        default=0.0,
        metadata={
            "help": "Hold out this fraction (0..1) of the training samples for evaluation "
            "(a fixed, seed-independent split). Not combinable with --eval_data_path."
        },
    )
    lazy_preprocess: bool = field(
        default=False,
        metadata={
            "help": "Encode each sample when it is first used instead of tokenising everything up front "
            "(for files too large to pre-tokenise; no cache, no token statistics, no packing)."
        },
    )
    data_format: DataFormat = field(
        default="auto",
        metadata={
            "help": f"Input format, one of {', '.join(DATA_FORMATS)}: auto detects it per file; the layout of "
            "each is in docs/data_formats.md."
        },
    )
    system_message: str = field(
        default=DEFAULT_SYSTEM_PROMPT,
        metadata={"help": "System prompt for samples that do not carry their own."},
    )
    label_policy: LabelPolicy = field(
        default="qwen",
        metadata={
            "help": "Which tokens are trained on. qwen: exactly the original finetune.py targets "
            "(control tokens of every turn, assistant content); assistant_only: assistant content and its "
            "<|im_end|> only. Preference pairs always train on the answers only.",
        },
    )
    truncation: TruncationPolicy = field(
        default="drop_turns",
        metadata={
            "help": "Samples longer than model_max_length: drop_turns drops whole turns from the end so the "
            "sample ends after a complete assistant turn (skipped if not even the first exchange fits); "
            "cut keeps the first model_max_length tokens (the original behaviour). Preference pairs lose "
            "prompt turns from the front (drop_turns) or prompt tokens from the left (cut), never answer tokens.",
        },
    )
    allow_special_tokens_in_data: bool = field(
        default=False,
        metadata={
            "help": "Turn special-token text in the data (e.g. '<|im_end|>') into real control tokens, as the "
            "original finetune.py did. By default such text is encoded as plain text."
        },
    )
    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack several samples per row up to model_max_length; positions restart per sample and "
            "samples do not attend to each other."
        },
    )
    pad_to_max_length: bool = field(
        default=False,
        metadata={
            "help": "Pad every row to model_max_length (the original behaviour). Default: pad each batch to "
            "its longest row."
        },
    )
    preprocessing_num_workers: int | None = field(
        default=None,
        metadata={"help": "Processes for tokenisation (datasets map num_proc). Default: one process."},
    )
    data_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where tokenised data is cached, keyed by file contents, tokenizer and options. "
            "Default: $XDG_CACHE_HOME/qwen_finetune/data (~/.cache/qwen_finetune/data)."
        },
    )
    check_data: bool = field(
        default=False,
        metadata={"help": "Validate and encode the data, print the data report, then exit without training."},
    )
    dump_encoded: str | None = field(
        default=None,
        metadata={
            "help": "With --check_data: write one JSON line per kept sample {id, input_ids, labels} "
            "(-100 = not trained on) to this file."
        },
    )

    def __post_init__(self) -> None:
        for name, allowed in (
            ("data_format", DATA_FORMATS),
            ("label_policy", LABEL_POLICIES),
            ("truncation", TRUNCATION_POLICIES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ArgumentError(f"--{name} {value!r} is not one of {', '.join(allowed)}")
        if not 0.0 <= self.eval_split_ratio < 1.0:
            raise ArgumentError(f"--eval_split_ratio {self.eval_split_ratio} must be in [0, 1)")
        if self.eval_split_ratio > 0 and self.eval_data_path:
            raise ArgumentError(
                "--eval_split_ratio and --eval_data_path both define the eval set; give only one"
            )
        if self.packing and self.lazy_preprocess:
            raise ArgumentError(
                "--packing needs every sample's length before training, --lazy_preprocess encodes on the fly; "
                "drop one of them"
            )
        if self.preprocessing_num_workers is not None and self.preprocessing_num_workers < 1:
            raise ArgumentError(f"--preprocessing_num_workers {self.preprocessing_num_workers} must be >= 1")
        if self.dump_encoded and not self.check_data:
            raise ArgumentError("--dump_encoded is written by --check_data; add --check_data")

    def encoding_options(self, model_max_length: int, kind: DataKind = "supervised") -> EncodingOptions:
        return EncodingOptions(
            kind=kind,
            max_length=model_max_length,
            data_format=self.data_format,
            system_message=self.system_message,
            label_policy=self.label_policy,
            truncation=self.truncation,
            allow_special=self.allow_special_tokens_in_data,
        )

    @property
    def train_files(self) -> list[str]:
        return split_paths(self.data_path)

    @property
    def eval_files(self) -> list[str]:
        return split_paths(self.eval_data_path)

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.data_cache_dir).expanduser() if self.data_cache_dir else default_data_cache_dir()

"""ChatML token ids and labels for a list of turns, under a label policy and a truncation policy.

Every turn is encoded in parts, as the original finetune.py did, its content as one text:
    <|im_start|> + ids(role) + ids("\\n") + ids(content) + <|im_end|> + ids("\\n")
Labels are not shifted (the model shifts); -100 marks tokens that are not trained on. The content of
a ReAct turn is made of pieces that are trained on or not (a tool result is not); it is still encoded
whole, as the chat template and inference servers encode it, and a token is trained on when any of
its characters belongs to a trained piece.

Label policy `qwen` (the original targets, token for token):
    system / user turn: <|im_start|>, <|im_end|> and the final "\\n" are trained on, nothing else;
    assistant turn:     everything except the role name and its "\\n" is trained on.
Label policy `assistant_only`: only the assistant content and its <|im_end|>.
Tool results inside an assistant turn are never trained on, in either policy.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import datasets

from qwen_finetune.tokenizer_protocol import QwenTokenizerLike
from qwen_model.chunked_loss import IGNORE_INDEX
from qwen_model.tokenization_qwen import nfc_positions, token_char_spans

from .args import EncodingOptions, LabelPolicy
from .turns import ASSISTANT_ROLE, Turn

SKIP_TOO_LONG = "too_long"
SKIP_NOTHING_LEFT_AFTER_CUT = "nothing_to_learn_after_cut"
SKIP_REASONS = {
    SKIP_TOO_LONG: "not even the first user+assistant exchange fits in model_max_length (truncation drop_turns); "
    "raise model_max_length or use --truncation cut",
    SKIP_NOTHING_LEFT_AFTER_CUT: "cutting at model_max_length left no assistant token to learn (truncation cut); "
    "raise model_max_length or shorten the prompt",
}


@dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    skip_reason: str = ""

    @property
    def num_supervised(self) -> int:
        """Tokens the loss sees: position 0 is never predicted, so it does not count."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass
class EncodedTurn:
    input_ids: list[int]
    labels: list[int]
    answer_mask: list[bool]  # True where an assistant answer token (content or <|im_end|>) is trained on


class ChatMLEncoder:
    """Encodes turns (see turns.py) for one tokenizer and one set of options; cheap to call per sample."""

    # The columns `encode_row` gives, as the cached dataset stores them.
    features = datasets.Features(
        {
            "input_ids": datasets.Sequence(datasets.Value("int32")),
            "labels": datasets.Sequence(datasets.Value("int32")),
            "length": datasets.Value("int32"),
            "num_supervised": datasets.Value("int32"),
            "truncated": datasets.Value("bool"),
            "skip_reason": datasets.Value("string"),
        }
    )
    # Columns only the data report reads; the training dataset drops them.
    stat_columns = ("num_supervised", "truncated", "skip_reason")

    def __init__(self, tokenizer: QwenTokenizerLike, options: EncodingOptions) -> None:
        self.tokenizer = tokenizer
        self.options = options
        self.max_length = options.max_length
        self.im_start = tokenizer.im_start_id
        self.im_end = tokenizer.im_end_id
        self.newline = tokenizer.encode_text("\n")
        self.role_ids = {role: tokenizer.encode_text(role) for role in ("system", "user", "assistant")}

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode_text(text, allow_special=self.options.allow_special)

    def encode_turn(self, turn: Turn, label_policy: LabelPolicy | None = None) -> EncodedTurn:
        """One turn with its labels under `label_policy` (default: the options' policy)."""
        label_policy = label_policy or self.options.label_policy
        role_ids = self.role_ids[turn.role]
        header = [self.im_start, *role_ids, *self.newline]
        footer = [self.im_end, *self.newline]
        is_assistant = turn.role == ASSISTANT_ROLE
        content = self.encode_text(turn.text)
        if is_assistant:
            trained = self._trained_tokens(turn, content)
            content_labels = [token if keep else IGNORE_INDEX for token, keep in zip(content, trained)]
        else:
            content_labels = [IGNORE_INDEX] * len(content)
        masked_header = [IGNORE_INDEX] * (len(header) - 1)
        masked_newline = [IGNORE_INDEX] * len(self.newline)
        if label_policy == "qwen":
            first = self.im_start
            tail = footer
        else:
            first = IGNORE_INDEX
            tail = [self.im_end if is_assistant else IGNORE_INDEX, *masked_newline]
        labels = [first, *masked_header, *content_labels, *tail]
        answer_mask = [False] * len(header)
        answer_mask += [is_assistant and label != IGNORE_INDEX for label in content_labels]
        answer_mask += [is_assistant] + [False] * len(self.newline)
        return EncodedTurn([*header, *content, *footer], labels, answer_mask)

    def _trained_tokens(self, turn: Turn, content: list[int]) -> list[bool]:
        """Per content token: does any of its characters belong to a trained piece of the turn?"""
        if all(trained for _, trained in turn.pieces):
            return [True] * len(content)
        trained_chars = [trained for text, trained in turn.pieces for _ in text]
        positions = nfc_positions(turn.text)  # the tokens spell the NFC form of the text
        if positions is not None:
            normalized = [False] * positions[-1]
            for index, trained in enumerate(trained_chars):
                normalized[positions[index]] |= trained
            trained_chars = normalized
        trained_before = list(itertools.accumulate(trained_chars, initial=0))
        spans = token_char_spans(self._token_bytes(token) for token in content)
        return [trained_before[end] > trained_before[start] for start, end in spans]

    def _token_bytes(self, token: int) -> bytes:
        return self.tokenizer.vocabulary.encoding.decode_single_token_bytes(token)

    def encode(self, turns: list[Turn]) -> EncodedSample:
        """The sample, truncated to max_length. A sample that keeps nothing to learn still gets its
        (cut) ids and labels, with `skip_reason` set: the caller decides to skip it."""
        encoded = [self.encode_turn(turn) for turn in turns]
        total = sum(len(turn.input_ids) for turn in encoded)
        if total > self.max_length and self.options.truncation == "drop_turns":
            kept = self._turns_that_fit(turns, encoded)
            if kept:
                return self._join(encoded[:kept], truncated=True)
            sample = self._cut(encoded)
            sample.skip_reason = SKIP_TOO_LONG
            return sample
        if total > self.max_length:
            return self._cut(encoded)
        return self._join(encoded, truncated=False)

    def encode_row(self, turns: list[Turn]) -> dict[str, Any]:
        """The dataset row of one sample (`features`); a skipped sample keeps only its stats."""
        sample = self.encode(turns)
        kept = not sample.skip_reason
        return {
            "input_ids": sample.input_ids if kept else [],
            "labels": sample.labels if kept else [],
            "length": len(sample.input_ids) if kept else 0,
            "num_supervised": sample.num_supervised if kept else 0,
            "truncated": sample.truncated,
            "skip_reason": sample.skip_reason,
        }

    def _turns_that_fit(self, turns: list[Turn], encoded: list[EncodedTurn]) -> int:
        """How many leading turns to keep: the longest prefix that fits and ends with an assistant turn."""
        kept = 0
        length = 0
        for position, (turn, encoded_turn) in enumerate(zip(turns, encoded)):
            length += len(encoded_turn.input_ids)
            if length > self.max_length:
                break
            if turn.role == ASSISTANT_ROLE:
                kept = position + 1
        return kept

    @staticmethod
    def _join(encoded: list[EncodedTurn], *, truncated: bool) -> EncodedSample:
        input_ids = [token for turn in encoded for token in turn.input_ids]
        labels = [label for turn in encoded for label in turn.labels]
        return EncodedSample(input_ids, labels, truncated=truncated)

    def _cut(self, encoded: list[EncodedTurn]) -> EncodedSample:
        sample = self._join(encoded, truncated=True)
        sample.input_ids = sample.input_ids[: self.max_length]
        sample.labels = sample.labels[: self.max_length]
        answer_mask = [flag for turn in encoded for flag in turn.answer_mask][: self.max_length]
        if not any(answer_mask):
            sample.skip_reason = SKIP_NOTHING_LEFT_AFTER_CUT
        return sample

"""ChatML token ids and labels for a list of turns, under a label policy and a truncation policy.

Every turn is encoded piece by piece, as the original finetune.py did:
    <|im_start|> + ids(role) + ids("\\n") + ids(content) + <|im_end|> + ids("\\n")
Labels are not shifted (the model shifts); -100 marks tokens that are not trained on.

Label policy `qwen` (the original targets, token for token):
    system / user turn: <|im_start|>, <|im_end|> and the final "\\n" are trained on, nothing else;
    assistant turn:     everything except the role name and its "\\n" is trained on.
Label policy `assistant_only`: only the assistant content and its <|im_end|>.
Tool results inside an assistant turn are never trained on, in either policy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qwen_model.chunked_loss import IGNORE_INDEX

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
class _EncodedTurn:
    input_ids: list[int]
    labels: list[int]
    answer_mask: list[bool]  # True where an assistant answer token (content or <|im_end|>) is trained on


class ChatMLEncoder:
    """Encodes turns (see turns.py) for one tokenizer and one set of options; cheap to call per sample."""

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_length: int,
        label_policy: str = "qwen",
        truncation: str = "drop_turns",
        allow_special: bool = False,
    ) -> None:
        if label_policy not in ("qwen", "assistant_only"):
            raise ValueError(f"unknown label policy {label_policy!r}")
        if truncation not in ("drop_turns", "cut"):
            raise ValueError(f"unknown truncation policy {truncation!r}")
        if max_length < 1:
            raise ValueError(f"model_max_length must be positive, got {max_length}")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.label_policy = label_policy
        self.truncation = truncation
        self.allow_special = allow_special
        self.im_start = tokenizer.im_start_id
        self.im_end = tokenizer.im_end_id
        self.newline = tokenizer.encode_text("\n")
        self.role_ids = {role: tokenizer.encode_text(role) for role in ("system", "user", "assistant")}

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode_text(text, allow_special=self.allow_special)

    def _encode_turn(self, turn: Turn) -> _EncodedTurn:
        role_ids = self.role_ids[turn.role]
        header = [self.im_start, *role_ids, *self.newline]
        footer = [self.im_end, *self.newline]
        content: list[int] = []
        content_labels: list[int] = []
        is_assistant = turn.role == ASSISTANT_ROLE
        for text, trained in turn.pieces:
            ids = self.encode_text(text)
            content += ids
            content_labels += ids if is_assistant and trained else [IGNORE_INDEX] * len(ids)
        masked_header = [IGNORE_INDEX] * (len(header) - 1)
        masked_newline = [IGNORE_INDEX] * len(self.newline)
        if self.label_policy == "qwen":
            first = self.im_start
            tail = footer
        else:
            first = IGNORE_INDEX
            tail = [self.im_end if is_assistant else IGNORE_INDEX, *masked_newline]
        if not is_assistant:
            content_labels = [IGNORE_INDEX] * len(content)
        labels = [first, *masked_header, *content_labels, *tail]
        answer_mask = [False] * len(header)
        answer_mask += [is_assistant and label != IGNORE_INDEX for label in content_labels]
        answer_mask += [is_assistant] + [False] * len(self.newline)
        return _EncodedTurn([*header, *content, *footer], labels, answer_mask)

    def encode(self, turns: list[Turn]) -> EncodedSample:
        """The sample, truncated to max_length. A sample that keeps nothing to learn still gets its
        (cut) ids and labels, with `skip_reason` set: the caller decides to skip it."""
        encoded = [self._encode_turn(turn) for turn in turns]
        total = sum(len(turn.input_ids) for turn in encoded)
        if total > self.max_length and self.truncation == "drop_turns":
            kept = self._turns_that_fit(turns, encoded)
            if kept:
                return self._join(encoded[:kept], truncated=True)
            sample = self._cut(encoded)
            sample.skip_reason = SKIP_TOO_LONG
            return sample
        if total > self.max_length:
            return self._cut(encoded)
        return self._join(encoded, truncated=False)

    def _turns_that_fit(self, turns: list[Turn], encoded: list[_EncodedTurn]) -> int:
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
    def _join(encoded: list[_EncodedTurn], *, truncated: bool) -> EncodedSample:
        input_ids = [token for turn in encoded for token in turn.input_ids]
        labels = [label for turn in encoded for label in turn.labels]
        return EncodedSample(input_ids, labels, truncated=truncated)

    def _cut(self, encoded: list[_EncodedTurn]) -> EncodedSample:
        sample = self._join(encoded, truncated=True)
        sample.input_ids = sample.input_ids[: self.max_length]
        sample.labels = sample.labels[: self.max_length]
        answer_mask = [flag for turn in encoded for flag in turn.answer_mask][: self.max_length]
        if not any(answer_mask):
            sample.skip_reason = SKIP_NOTHING_LEFT_AFTER_CUT
        return sample

"""ChatML token ids of a preference pair: one prompt, two answers, fitted into model_max_length.

The prompt is every prompt turn encoded as in chatml.py, followed by `<|im_start|>assistant\\n`
(what the model is given before it answers); an answer is its content and `<|im_end|>`, every token
trained on (tool calls included). The prompt is never trained on, whatever --label_policy says. The
sequences the model sees are prompt + chosen and prompt + rejected.

A pair longer than model_max_length loses prompt, never answer: drop_turns drops whole prompt turns
from the front (after the system turn) until it fits and the prompt starts with a user turn; cut keeps
the last tokens of the prompt. A pair whose answers cannot fit is skipped, with its reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import datasets

from qwen_finetune.tokenizer_protocol import QwenTokenizerLike
from qwen_model.chunked_loss import IGNORE_INDEX

from .args import EncodingOptions
from .chatml import ChatMLEncoder
from .turns import ASSISTANT_ROLE, USER_ROLE, Turn

# Each pair's row in the encoded table of its files: with the table's cache key, names the pair for
# values computed once per pair (the reference log-probabilities of preference training).
PAIR_ROW = "pair_row"

SKIP_ANSWER_TOO_LONG = "answer_too_long"
SKIP_PROMPT_TOO_LONG = "prompt_too_long"
SKIP_REASONS = {
    SKIP_ANSWER_TOO_LONG: "the longer answer (chosen or rejected) does not fit in model_max_length even without "
    "its prompt; raise model_max_length or shorten the answers",
    SKIP_PROMPT_TOO_LONG: "not even the system turn, the last user turn and the longer answer fit in "
    "model_max_length (truncation drop_turns); raise model_max_length or use --truncation cut",
}


def pair_sequence(
    prompt_ids: list[int], answer_ids: list[int], answer_labels: list[int]
) -> tuple[list[int], list[int]]:
    """One full sequence of a pair, prompt + answer, with -100 on the prompt."""
    return [*prompt_ids, *answer_ids], [IGNORE_INDEX] * len(prompt_ids) + list(answer_labels)


@dataclass
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]
    chosen_labels: list[int]
    rejected_ids: list[int]
    rejected_labels: list[int]
    truncated: bool = False
    skip_reason: str = ""

    @property
    def length(self) -> int:
        """Tokens of the longer of the two sequences."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


class PairEncoder:
    """Encodes a pair given as turns: the prompt turns, then the chosen and the rejected answer turn
    (turns.pair_to_turns)."""

    features = datasets.Features(
        {
            "prompt_ids": datasets.Sequence(datasets.Value("int32")),
            "chosen_ids": datasets.Sequence(datasets.Value("int32")),
            "chosen_labels": datasets.Sequence(datasets.Value("int32")),
            "rejected_ids": datasets.Sequence(datasets.Value("int32")),
            "rejected_labels": datasets.Sequence(datasets.Value("int32")),
            "length": datasets.Value("int32"),
            "truncated": datasets.Value("bool"),
            "skip_reason": datasets.Value("string"),
        }
    )
    stat_columns = ("truncated", "skip_reason")

    def __init__(self, tokenizer: QwenTokenizerLike, options: EncodingOptions) -> None:
        self.chatml = ChatMLEncoder(tokenizer, options)
        self.options = options
        self.answer_header = [
            self.chatml.im_start,
            *self.chatml.role_ids[ASSISTANT_ROLE],
            *self.chatml.newline,
        ]

    def _answer(self, turn: Turn) -> tuple[list[int], list[int]]:
        """Content + <|im_end|>: the assistant turn without its header and its final newline."""
        encoded = self.chatml.encode_turn(turn, "assistant_only")
        part = slice(len(self.answer_header), len(encoded.input_ids) - len(self.chatml.newline))
        return encoded.input_ids[part], encoded.labels[part]

    def encode(self, turns: list[Turn]) -> EncodedPair:
        *prompt_turns, chosen_turn, rejected_turn = turns
        chosen_ids, chosen_labels = self._answer(chosen_turn)
        rejected_ids, rejected_labels = self._answer(rejected_turn)
        prompt = [self.chatml.encode_turn(turn).input_ids for turn in prompt_turns]
        room = self.options.max_length - len(self.answer_header) - max(len(chosen_ids), len(rejected_ids))
        prompt_ids, skip_reason = self._fit_prompt(prompt_turns, prompt, room)
        return EncodedPair(
            prompt_ids=[*prompt_ids, *self.answer_header],
            chosen_ids=chosen_ids,
            chosen_labels=chosen_labels,
            rejected_ids=rejected_ids,
            rejected_labels=rejected_labels,
            truncated=sum(map(len, prompt)) > room,
            skip_reason=skip_reason,
        )

    def _fit_prompt(self, turns: list[Turn], encoded: list[list[int]], room: int) -> tuple[list[int], str]:
        """The prompt ids that fit in `room` tokens, and a skip reason when there is no such prompt."""
        if room < 0:
            return [], SKIP_ANSWER_TOO_LONG
        flat = [token for ids in encoded for token in ids]
        if len(flat) <= room:
            return flat, ""
        if self.options.truncation == "cut":
            return flat[len(flat) - room :], ""
        system, *body = encoded
        kept = len(system) + sum(map(len, body))
        for start, turn in enumerate(turns[1:]):
            if turn.role == USER_ROLE and kept <= room:
                return [*system, *(token for ids in body[start:] for token in ids)], ""
            kept -= len(body[start])
        return [], SKIP_PROMPT_TOO_LONG

    def encode_row(self, turns: list[Turn]) -> dict[str, Any]:
        """The dataset row of one pair (`features`); a skipped pair keeps only its stats."""
        pair = self.encode(turns)
        kept = not pair.skip_reason
        row: dict[str, Any] = {
            name: getattr(pair, name) if kept else []
            for name in ("prompt_ids", "chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels")
        }
        row.update(length=pair.length if kept else 0, truncated=pair.truncated, skip_reason=pair.skip_reason)
        return row

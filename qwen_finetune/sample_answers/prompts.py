"""The prompts the model answers at each evaluation, as the token ids it is trained on.

Every prompt is encoded exactly as training encodes a conversation (the same ChatML pieces, system
prompt, tool rendering and special-token policy) and ends with the header of the assistant turn the
model is to write. Three sources: plain questions (a .txt file, one per line, or a JSON list of
strings), conversations in any training data format (the last assistant turn is the reference
answer, the turns before it the prompt), and the first samples of the eval set (cut the same way;
a preference pair gives its prompt, and its chosen answer as the reference).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qwen_finetune.data.args import EncodingOptions
from qwen_finetune.data.chatml import ChatMLEncoder
from qwen_finetune.data.errors import DataError
from qwen_finetune.data.formats import USER, Conversation, Message, load_file, read_records
from qwen_finetune.data.turns import ASSISTANT_ROLE, USER_ROLE, Turn, conversation_to_turns
from qwen_finetune.errors import ArgumentError
from qwen_finetune.tokenizer_protocol import QwenTokenizerLike

from .args import SampleArguments

QUESTION_FILE_SUFFIXES = (".txt",)


@dataclass(frozen=True)
class SamplePrompt:
    """One prompt: `input_ids` end with `<|im_start|>assistant\\n`; `question` is its last user turn and
    `prompt_text` the whole prompt as ChatML text, for people; `reference` the expected answer, if any."""

    id: str
    input_ids: tuple[int, ...]
    question: str
    prompt_text: str
    reference: str | None


def chatml_turns(ids: Sequence[int], tokenizer: QwenTokenizerLike) -> list[tuple[str, str]]:
    """(role, content) of every complete `<|im_start|>role\\ncontent<|im_end|>` turn in `ids`."""
    turns = []
    start: int | None = None
    for position, token in enumerate(ids):
        if token == tokenizer.im_start_id:
            start = position + 1
        elif token == tokenizer.im_end_id and start is not None:
            role, _, content = tokenizer.decode(list(ids[start:position])).partition("\n")
            turns.append((role, content))
            start = None
    return turns


def _sample_prompt(
    sample_id: str, input_ids: Sequence[int], reference: str | None, tokenizer: QwenTokenizerLike
) -> SamplePrompt:
    user_turns = [content for role, content in chatml_turns(input_ids, tokenizer) if role == USER_ROLE]
    return SamplePrompt(
        id=sample_id,
        input_ids=tuple(input_ids),
        question=user_turns[-1] if user_turns else "",
        prompt_text=tokenizer.decode(list(input_ids)),
        reference=reference,
    )


def assistant_header(encoder: ChatMLEncoder) -> list[int]:
    """`<|im_start|>assistant\\n`: where the model's answer begins."""
    return [encoder.im_start, *encoder.role_ids[ASSISTANT_ROLE], *encoder.newline]


def _conversation_prompt(
    conversation: Conversation, encoder: ChatMLEncoder, tokenizer: QwenTokenizerLike
) -> SamplePrompt:
    turns: list[Turn] = conversation_to_turns(conversation, encoder.options.system_message)
    reference = None
    if turns[-1].role == ASSISTANT_ROLE:
        reference = turns[-1].text
        turns = turns[:-1]
    ids = [token for turn in turns for token in encoder.encode_turn(turn).input_ids]
    return _sample_prompt(conversation.id, [*ids, *assistant_header(encoder)], reference, tokenizer)


def _questions(path: Path, records: list[Any], lines: list[int | None]) -> list[Conversation]:
    conversations = []
    for index, (question, line) in enumerate(zip(records, lines)):
        if not isinstance(question, str):
            raise DataError(
                "the file mixes questions (strings) and other values",
                fix="give either only questions (strings) or only conversations (objects)",
                file=path,
                index=index,
                line=line,
            )
        if not question.strip():
            raise DataError(
                "the question is empty",
                fix="remove it or write the question",
                file=path,
                index=index,
                line=line,
            )
        conversations.append(Conversation(id=f"{path.name}:{index}", messages=[Message(USER, question)]))
    return conversations


def _text_questions(path: Path) -> list[Conversation]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(
            f"cannot read the questions ({error})",
            fix="give a UTF-8 text file with one question per line",
            file=path,
        ) from None
    questions = [line for line in text.splitlines() if line.strip()]
    if not questions:
        raise DataError("the file holds no question", fix="write one question per line", file=path)
    return _questions(path, questions, [None] * len(questions))


def read_prompt_file(
    path: str | Path, encoder: ChatMLEncoder, tokenizer: QwenTokenizerLike
) -> list[SamplePrompt]:
    """The prompts of a --sample_prompts file (see the module docstring for what it may hold)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", fix="check the path given to --sample_prompts", file=path)
    if path.suffix.lower() in QUESTION_FILE_SUFFIXES:
        conversations = _text_questions(path)
    else:
        records, lines = read_records(path)  # DataError for an empty or invalid file
        if any(isinstance(record, str) for record in records):
            conversations = _questions(path, records, lines)
        else:
            conversations = load_file(path).conversations  # the format of this file, whatever the data's
    return [_conversation_prompt(conversation, encoder, tokenizer) for conversation in conversations]


def _prompt_and_answer(row: dict[str, Any], header: list[int]) -> tuple[list[int], list[int]] | None:
    """A conversation row split before its last assistant turn; a preference pair's prompt and chosen
    answer. None when the row has no complete assistant header."""
    if "prompt_ids" in row:
        return list(row["prompt_ids"]), list(row["chosen_ids"])
    ids = list(row["input_ids"])
    starts = [
        position
        for position in range(len(ids) - len(header) + 1)
        if ids[position : position + len(header)] == header
    ]
    if not starts:
        return None
    answer_start = starts[-1] + len(header)
    return ids[:answer_start], ids[answer_start:]


def eval_set_prompts(
    eval_samples: Any, count: int, encoder: ChatMLEncoder, tokenizer: QwenTokenizerLike
) -> list[SamplePrompt]:
    """The first `count` eval samples, each cut before its last assistant turn, whose text is the
    reference (for preference pairs: the prompt, and the chosen answer as the reference)."""
    header = assistant_header(encoder)
    prompts = []
    for index in range(count):
        row = eval_samples[index]
        split = _prompt_and_answer(row, header)
        if split is None:  # a kept sample always has an assistant turn; this one was cut inside its header
            raise DataError(
                "the eval sample has no complete assistant turn header to answer after",
                fix="raise --model_max_length, or use --truncation drop_turns",
                index=index,
                sample_id=str(row["id"]),
            )
        prompt, answer = split
        if encoder.im_end in answer:
            answer = answer[: answer.index(encoder.im_end)]
        prompts.append(_sample_prompt(str(row["id"]), prompt, tokenizer.decode(answer), tokenizer))
    return prompts


def build_sample_prompts(
    sample_args: SampleArguments,
    tokenizer: QwenTokenizerLike,
    options: EncodingOptions,
    eval_samples: Any | None,
    *,
    evaluates: bool,
) -> list[SamplePrompt]:
    """Every prompt asked for by --sample_prompts and --eval_samples, checked before any weight is loaded.

    `eval_samples`: the kept eval samples one by one (`SupervisedData.eval_samples`), None without an
    eval set; `evaluates`: whether the run evaluates at all (its --eval_strategy is not no)."""
    if not sample_args.requested:
        return []
    if not evaluates:
        raise ArgumentError(
            "--sample_prompts / --eval_samples are answered at each evaluation, but this run never evaluates; "
            "add --eval_strategy steps --eval_steps N (and an eval set: --eval_data_path or --eval_split_ratio)"
        )
    encoder = ChatMLEncoder(tokenizer, options)
    prompts = (
        read_prompt_file(sample_args.sample_prompts, encoder, tokenizer) if sample_args.sample_prompts else []
    )
    if sample_args.eval_samples:
        available = 0 if eval_samples is None else len(eval_samples)
        if sample_args.eval_samples > available:
            raise ArgumentError(
                f"--eval_samples {sample_args.eval_samples}: the eval set has {available} samples; "
                + (
                    "give an eval set with --eval_data_path or --eval_split_ratio"
                    if eval_samples is None
                    else f"ask for at most {available}"
                )
            )
        prompts += eval_set_prompts(eval_samples, sample_args.eval_samples, encoder, tokenizer)
    return prompts

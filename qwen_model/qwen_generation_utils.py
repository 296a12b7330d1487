"""ChatML prompts, stop words, and the chat()/chat_stream() behind `QWenLMHeadModel.chat` / `.chat_stream`.

A flat module (torch and transformers only), copied next to checkpoints with the model files.

Prompt layout (each text piece encoded as plain text, so special-token text typed by a user never
becomes a control token):
    <|im_start|>system\\n{system}<|im_end|>
    \\n<|im_start|>user\\n{query}<|im_end|>\\n<|im_start|>assistant\\n{response}<|im_end|>   (history)
    \\n<|im_start|>user\\n{query}<|im_end|>\\n<|im_start|>assistant\\n                       (this turn)
"""

from __future__ import annotations

import copy
import queue
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any

import torch
from transformers import (
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)
from transformers.generation.streamers import BaseStreamer

from .chat_format import DEFAULT_SYSTEM_PROMPT

DEFAULT_MAX_WINDOW_SIZE = 6144
History = list[tuple[str, str]]


def chatml_turn_ids(tokenizer: Any, role: str, content: str) -> list[int]:
    """`<|im_start|>{role}\\n{content}<|im_end|>`, role and content encoded as plain text."""
    return [
        tokenizer.im_start_id,
        *tokenizer.encode_text(role),
        *tokenizer.encode_text("\n"),
        *tokenizer.encode_text(content),
        tokenizer.im_end_id,
    ]


def check_history(history: Sequence[Sequence[str]] | None) -> History:
    """History as a list of (query, response) string pairs, or a ValueError naming the bad entry."""
    checked: History = []
    for index, turn in enumerate(history or []):
        if isinstance(turn, str) or len(turn) != 2 or not all(isinstance(text, str) for text in turn):
            raise ValueError(f"history[{index}] must be a (query, response) pair of strings, got {turn!r}")
        checked.append((turn[0], turn[1]))
    return checked


def make_context(
    tokenizer: Any,
    query: str,
    history: Sequence[Sequence[str]] | None = None,
    system: str = DEFAULT_SYSTEM_PROMPT,
    max_window_size: int = DEFAULT_MAX_WINDOW_SIZE,
    chat_format: str = "chatml",
) -> tuple[str, list[int]]:
    """The prompt text and its token ids for answering `query` after `history`.

    The newest history turns are kept while system + kept history fit in `max_window_size` tokens;
    older ones are dropped. The current query is not counted (it is always included).
    `chat_format="raw"` (base models) is the query alone.
    """
    if chat_format == "raw":
        return query, tokenizer.encode_text(query)
    if chat_format != "chatml":
        raise ValueError(f"unknown chat_format {chat_format!r}: expected 'chatml' or 'raw'")
    newline = tokenizer.encode_text("\n")
    system_ids = chatml_turn_ids(tokenizer, "system", system)
    kept_ids: list[int] = []
    kept_text = ""
    for past_query, past_response in reversed(check_history(history)):
        turn_ids = [
            *newline,
            *chatml_turn_ids(tokenizer, "user", past_query),
            *newline,
            *chatml_turn_ids(tokenizer, "assistant", past_response),
        ]
        if len(system_ids) + len(kept_ids) + len(turn_ids) > max_window_size:
            break
        kept_ids = turn_ids + kept_ids
        kept_text = (
            f"\n<|im_start|>user\n{past_query}<|im_end|>\n<|im_start|>assistant\n{past_response}<|im_end|>"
            + kept_text
        )
    query_ids = [
        *newline,
        *chatml_turn_ids(tokenizer, "user", query),
        *newline,
        tokenizer.im_start_id,
        *tokenizer.encode_text("assistant"),
        *newline,
    ]
    text = (
        f"<|im_start|>system\n{system}<|im_end|>{kept_text}"
        f"\n<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"
    )
    return text, system_ids + kept_ids + query_ids


def get_stop_words_ids(chat_format: str, tokenizer: Any) -> list[list[int]]:
    """Tokens that end an answer: <|im_end|>, <|im_start|> and <|endoftext|> (raw: only the last)."""
    if chat_format == "chatml":
        return [[tokenizer.im_end_id], [tokenizer.im_start_id], [tokenizer.eod_id]]
    if chat_format == "raw":
        return [[tokenizer.eod_id]]
    raise ValueError(f"unknown chat_format {chat_format!r}: expected 'chatml' or 'raw'")


def check_stop_words_ids(stop_words_ids: Any) -> list[list[int]]:
    """`stop_words_ids` as a list of token-id lists, or a ValueError naming the bad entry."""
    if not isinstance(stop_words_ids, (list, tuple)):
        raise ValueError(f"stop_words_ids must be a list of token-id lists, got {stop_words_ids!r}")
    checked = []
    for index, sequence in enumerate(stop_words_ids):
        if (
            not isinstance(sequence, (list, tuple))
            or not sequence
            or not all(isinstance(token, int) and token >= 0 for token in sequence)
        ):
            raise ValueError(
                f"stop_words_ids[{index}] must be a non-empty list of token ids, got {sequence!r} "
                "(e.g. [tokenizer.encode('Observation:')])"
            )
        checked.append(list(sequence))
    return checked


class StopWordsLogitsProcessor(LogitsProcessor):
    """Ends a row with the end-of-text token on the step after it has generated a stop sequence.

    The behaviour of the original Qwen `generate(stop_words_ids=...)`: the stop sequence is kept in
    the output and the end-of-text token (`eos_token_id`, the first one if several) follows it; the
    row is then finished by `generate` as for any end-of-sequence token, while the other rows of a
    batch go on. Sequences that are a single eos id are left out (generation ends there anyway).
    Only tokens generated in this call count: a prompt that ends with a stop sequence stops nothing.
    """

    def __init__(
        self, stop_words_ids: Sequence[Sequence[int]], eos_token_id: int | Sequence[int] | None
    ) -> None:
        eos_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
        if not eos_ids:
            raise ValueError("stop_words_ids needs an end-of-text token: set generation_config.eos_token_id")
        self.end_id = int(eos_ids[0])
        self.sequences = [
            sequence
            for sequence in check_stop_words_ids(stop_words_ids)
            if not (len(sequence) == 1 and sequence[0] in eos_ids)
        ]
        self.prompt_length: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prompt_length is None:  # generate() first calls with the prompt alone
            self.prompt_length = input_ids.shape[1]
        generated = input_ids.shape[1] - self.prompt_length
        stopped = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for sequence in self.sequences:
            if len(sequence) <= generated:
                tail = torch.tensor(sequence, dtype=input_ids.dtype, device=input_ids.device)
                stopped |= (input_ids[:, -len(sequence) :] == tail).all(dim=-1)
        if not bool(stopped.any()):
            return scores
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.end_id] = 0.0
        return torch.where(stopped[:, None], forced, scores)  # type: ignore[return-value]


def decode_response(generated: Sequence[int], tokenizer: Any, stop_ids: Collection[int]) -> str:
    """Text of the generated tokens before the first stop token. Without a stop token (generation
    ended by length) every generated token is kept; the original dropped the last one."""
    end = next((position for position, token in enumerate(generated) if token in stop_ids), len(generated))
    return tokenizer.decode(list(generated[:end]), errors="replace").strip()


def _prepare_generation(
    model: Any,
    tokenizer: Any,
    query: str,
    history: History,
    system: str,
    generation_config: GenerationConfig | None,
    generate_kwargs: dict[str, Any],
) -> tuple[torch.Tensor, set[int], dict[str, Any]]:
    """Prompt ids, stop ids and the keyword arguments for `model.generate`."""
    # A GenerationConfig with the checkpoint's own fields (chat_format, stop_words_ids, ...) as attributes.
    config: Any = copy.deepcopy(
        generation_config if generation_config is not None else model.generation_config
    )
    chat_format = getattr(config, "chat_format", "chatml")
    if chat_format != "chatml":
        raise ValueError(
            f"generation_config.chat_format is {chat_format!r}, not 'chatml': this looks like a base "
            "(pre-trained) model, which was not trained to chat. Use a chat model, fine-tune this one on "
            "conversations, or call model.generate() on raw text."
        )
    max_window_size = (
        generate_kwargs.pop("max_window_size", None)
        or getattr(config, "max_window_size", None)
        or DEFAULT_MAX_WINDOW_SIZE
    )
    # The turn's control tokens end generation at once (eos ids); other stop sequences, of any
    # length, are let through and followed by <|endoftext|>, as in the original chat().
    control_ids = {ids[0] for ids in get_stop_words_ids(chat_format, tokenizer)}
    stop_words_ids = [
        ids
        for ids in check_stop_words_ids(
            [
                *(getattr(config, "stop_words_ids", None) or []),
                *(generate_kwargs.pop("stop_words_ids", None) or []),
            ]
        )
        if not (len(ids) == 1 and ids[0] in control_ids)
    ]
    config.stop_words_ids = None  # handled here, not again by the model's generate()
    # Generation options go into the config (transformers deprecates passing both); the rest
    # (stopping_criteria, logits_processor, ...) goes to generate() as is.
    other_kwargs = config.update(**generate_kwargs)
    configured_eos = config.eos_token_id if config.eos_token_id is not None else []
    configured_eos = [configured_eos] if isinstance(configured_eos, int) else list(configured_eos)
    stop_ids = control_ids | set(configured_eos)
    config.eos_token_id = sorted(stop_ids)
    if config.pad_token_id is None:
        config.pad_token_id = tokenizer.eod_id
    if stop_words_ids:
        other_kwargs["logits_processor"] = LogitsProcessorList(
            [
                *(other_kwargs.get("logits_processor") or []),
                StopWordsLogitsProcessor(stop_words_ids, tokenizer.eod_id),
            ]
        )
    # Embedding rows past the vocabulary have no token: a random or lightly trained model could
    # pick them, and the answer could not be decoded.
    tokenless_ids = range(len(tokenizer), model.config.vocab_size)
    config.suppress_tokens = sorted({*(config.suppress_tokens or []), *tokenless_ids}) or None

    _, context_ids = make_context(tokenizer, query, history, system, max_window_size, chat_format)
    input_ids = torch.tensor([context_ids], dtype=torch.long, device=model.device)
    kwargs = {
        "inputs": input_ids,
        "attention_mask": torch.ones_like(input_ids),
        "generation_config": config,
        **other_kwargs,
    }
    return input_ids, stop_ids, kwargs


def chat(
    model: Any,
    tokenizer: Any,
    query: str,
    history: Sequence[Sequence[str]] | None = None,
    system: str = DEFAULT_SYSTEM_PROMPT,
    generation_config: GenerationConfig | None = None,
    **generate_kwargs: Any,
) -> tuple[str, History]:
    """Answer `query` after `history`; returns the response and the history extended by this turn.

    `generate_kwargs` go to `model.generate` (e.g. `do_sample=False`, `max_new_tokens=64`), except
    `max_window_size`, which overrides the generation config, and `stop_words_ids` (token-id lists of
    any length, e.g. `[tokenizer.encode("Observation:")]`), which add to its stop words: the answer
    then ends with the stop sequence, as with the original chat().
    """
    history = check_history(history)
    input_ids, stop_ids, kwargs = _prepare_generation(
        model, tokenizer, query, history, system, generation_config, generate_kwargs
    )
    output = model.generate(**kwargs)
    response = decode_response(output[0, input_ids.shape[1] :].tolist(), tokenizer, stop_ids)
    return response, [*history, (query, response)]


class _TokenQueue(BaseStreamer):
    """Carries the tokens `generate` produces on its thread (and how it ended) to the reader."""

    _END = object()

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        self._prompt_skipped = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_skipped:  # generate() first hands over the prompt
            self._prompt_skipped = True
            return
        self._queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self._queue.put(self._END)

    def fail(self, error: BaseException) -> None:
        self._queue.put(error)

    def __iter__(self) -> Iterator[int]:
        while (item := self._queue.get()) is not self._END:
            if isinstance(item, BaseException):
                raise item
            yield from item


class _StopWhenSet(StoppingCriteria):
    """Ends generation once the reader has stopped reading."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any
    ) -> torch.BoolTensor:
        return torch.full(  # type: ignore[return-value]
            (input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device
        )


def _generate_into(streamer: _TokenQueue, generate: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    try:
        generate(streamer=streamer, **kwargs)
    except BaseException as error:  # handed to the reading thread, which raises it
        streamer.fail(error)


def chat_stream(
    model: Any,
    tokenizer: Any,
    query: str,
    history: Sequence[Sequence[str]] | None = None,
    system: str = DEFAULT_SYSTEM_PROMPT,
    generation_config: GenerationConfig | None = None,
    **generate_kwargs: Any,
) -> Iterator[str]:
    """Like `chat`, but yields the response as it grows (each string extends the previous one).

    `model.generate` runs on a worker thread with a streamer, so every decoding option of
    transformers (sampling, penalties, caches) applies unchanged. Text ending in an incomplete
    UTF-8 character is held back until the character is complete. An error in generation is
    raised here; stopping the iteration early stops the generation.
    """
    history = check_history(history)
    _, stop_ids, kwargs = _prepare_generation(
        model, tokenizer, query, history, system, generation_config, generate_kwargs
    )
    reader_gone = threading.Event()
    kwargs["stopping_criteria"] = StoppingCriteriaList(
        [*(kwargs.get("stopping_criteria") or []), _StopWhenSet(reader_gone)]
    )
    streamer = _TokenQueue()
    worker = threading.Thread(target=_generate_into, args=(streamer, model.generate, kwargs), daemon=True)
    worker.start()
    generated: list[int] = []
    shown = ""
    try:
        for token in streamer:
            if token in stop_ids:
                break
            generated.append(token)
            text = decode_response(generated, tokenizer, stop_ids)
            if text != shown and not text.endswith("\ufffd"):
                shown = text
                yield text
        final = decode_response(generated, tokenizer, stop_ids)
        if final != shown:
            yield final
    finally:
        reader_gone.set()
        worker.join()

"""Greedy answers to a list of prompts, in left-padded batches, without disturbing training.

The model generates in eval mode (no dropout) and goes back to the mode it was in. Each row of a
batch gets the tokens it gets alone: the model takes its positions from the attention mask, and
greedy decoding without a repetition penalty never looks at the padding. Under DeepSpeed ZeRO-3
with several processes every process must call this with the same prompts: each forward gathers
the partitioned weights from all of them, and `generate` keeps the processes in step until every
row of every process has finished (transformers turns on `synced_gpus` itself under ZeRO-3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig

from qwen_finetune.tokenizer_protocol import QwenTokenizerLike
from qwen_model.qwen_generation_utils import decode_response, get_stop_words_ids


@dataclass(frozen=True)
class GeneratedAnswer:
    text: str
    new_tokens: int  # generated tokens before the stop token (all of them when cut)
    stopped: bool  # ended with a stop token; False: cut at max_new_tokens


def greedy_generation_config(
    tokenizer: QwenTokenizerLike, vocab_size: int, max_new_tokens: int
) -> GenerationConfig:
    """Plain greedy decoding. transformers fills every field left unset from the checkpoint's own
    generation_config.json (Qwen's: sampling with top_p 0.8 and a repetition penalty of 1.1), so the
    sampling fields are set to their neutral values here. Stops at <|im_end|>, <|im_start|> or
    <|endoftext|>; embedding rows past the vocabulary have no token and are never chosen."""
    stop_ids = sorted({ids[0] for ids in get_stop_words_ids("chatml", tokenizer)})
    tokenless = list(range(len(tokenizer), vocab_size))
    return GenerationConfig(
        do_sample=False,
        num_beams=1,
        temperature=1.0,
        top_p=1.0,
        top_k=50,
        repetition_penalty=1.0,
        max_new_tokens=max_new_tokens,
        eos_token_id=stop_ids,
        pad_token_id=tokenizer.eod_id,
        suppress_tokens=tokenless or None,
        use_cache=True,
    )


def left_padded(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            input_ids[index, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
            attention_mask[index, width - len(row) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _answer(generated: list[int], tokenizer: QwenTokenizerLike, stop_ids: set[int]) -> GeneratedAnswer:
    stop = next((position for position, token in enumerate(generated) if token in stop_ids), None)
    return GeneratedAnswer(
        text=decode_response(generated, tokenizer, stop_ids),
        new_tokens=len(generated) if stop is None else stop,
        stopped=stop is not None,
    )


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: QwenTokenizerLike,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    device: torch.device,
) -> list[GeneratedAnswer]:
    """Greedy answers to `prompts` (token ids), `batch_size` prompts per `generate` call. `model`: a
    transformers model or a PEFT model around one (anything with `generate` and `config`)."""
    config = greedy_generation_config(tokenizer, int(model.config.vocab_size), max_new_tokens)
    stop_ids = set(config.eos_token_id)
    was_training = model.training
    model.eval()
    try:
        answers = []
        for first in range(0, len(prompts), batch_size):
            batch = prompts[first : first + batch_size]
            input_ids, attention_mask = left_padded(batch, tokenizer.eod_id, device)
            output = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, generation_config=config
            )
            for row in output[:, input_ids.shape[1] :].tolist():
                answers.append(_answer(row, tokenizer, stop_ids))
        return answers
    finally:
        model.train(was_training)

"""generate(stop_words_ids=...) as the original Qwen code: the stop sequence is let through, then the
row ends with <|endoftext|>; multi-token sequences, greedy and sampling, with and without cache, batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig

from qwen_model.modeling_qwen import QWenLMHeadModel
from qwen_model.qwen_generation_utils import StopWordsLogitsProcessor
from qwen_model.tokenization_qwen import ENDOFTEXT_ID

PROMPTS = [[9707, 1879, 11, 419, 374], [40, 1079, 264, 3460, 315]]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def model(tiny_chat_checkpoint: Path) -> QWenLMHeadModel:
    return QWenLMHeadModel.from_pretrained(tiny_chat_checkpoint).eval()


def generated(model: QWenLMHeadModel, prompts: list[list[int]], seed: int = 0, **options) -> list[list[int]]:
    """The new tokens of each row (rows have equal prompt lengths)."""
    inputs = torch.tensor(prompts)
    torch.manual_seed(seed)
    output = model.generate(
        inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=NEW_TOKENS, **options
    )
    return output[:, inputs.shape[1] :].tolist()


def stopped_after(free: list[int], stops: list[list[int]]) -> list[int]:
    """What the original makes of a free continuation: its tokens up to the end of the first stop
    sequence, then <|endoftext|> (the budget permitting)."""
    for end in range(1, len(free) + 1):
        if any(free[:end][-len(stop) :] == stop for stop in stops if len(stop) <= end):
            return [*free[:end], ENDOFTEXT_ID][:NEW_TOKENS]
    return free


def padded(rows: list[list[int]]) -> list[list[int]]:
    """Rows of a batch as generate returns them: finished rows padded with <|endoftext|>."""
    width = max(len(row) for row in rows)
    return [row + [ENDOFTEXT_ID] * (width - len(row)) for row in rows]


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
@pytest.mark.parametrize("length", [1, 2, 3])
def test_greedy_generation_ends_right_after_the_stop_sequence(
    model: QWenLMHeadModel, use_cache: bool, length: int
) -> None:
    free = generated(model, PROMPTS[:1], do_sample=False, stop_words_ids=[], use_cache=use_cache)[0]
    stop = free[5 : 5 + length]
    result = generated(model, PROMPTS[:1], do_sample=False, stop_words_ids=[stop], use_cache=use_cache)[0]
    assert result == stopped_after(free, [stop])
    assert result[-1] == ENDOFTEXT_ID and result[-1 - length : -1] == stop


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_sampling_follows_the_same_draws_until_the_stop_sequence(
    model: QWenLMHeadModel, use_cache: bool
) -> None:
    options = {"do_sample": True, "top_p": 0.8, "top_k": 0, "use_cache": use_cache}
    free = generated(model, PROMPTS[:1], seed=7, stop_words_ids=[], **options)[0]
    stop = free[4:6]
    result = generated(model, PROMPTS[:1], seed=7, stop_words_ids=[stop], **options)[0]
    assert result == stopped_after(free, [stop])
    assert result[-3:] == [*stop, ENDOFTEXT_ID]


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no-cache"])
def test_a_stopped_row_is_padded_while_the_others_go_on(model: QWenLMHeadModel, use_cache: bool) -> None:
    free = generated(model, PROMPTS, do_sample=False, stop_words_ids=[], use_cache=use_cache)
    stops = [free[0][2:4], free[1][7:10]]
    result = generated(model, PROMPTS, do_sample=False, stop_words_ids=stops, use_cache=use_cache)
    assert result == padded([stopped_after(free[0], stops), stopped_after(free[1], stops)])
    assert result[0][4:] == [ENDOFTEXT_ID] * (len(result[0]) - 4)  # ended after the stop, then padded
    assert result[1][10] == ENDOFTEXT_ID


def test_left_padded_rows_stop_as_they_do_alone(model: QWenLMHeadModel) -> None:
    short = PROMPTS[1][2:]
    alone = [
        model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, stop_words_ids=[])[
            0, len(prompt) :
        ].tolist()
        for prompt in (PROMPTS[0], short)
    ]
    stops = [alone[0][3:5], alone[1][6:8]]
    batch = torch.tensor([PROMPTS[0], [ENDOFTEXT_ID, ENDOFTEXT_ID, *short]])
    mask = torch.tensor([[1] * 5, [0, 0, 1, 1, 1]])
    result = model.generate(
        batch, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, stop_words_ids=stops
    )[:, 5:].tolist()
    assert result == padded([stopped_after(alone[0], stops), stopped_after(alone[1], stops)])


def test_stop_words_come_from_the_generation_config_unless_given(model: QWenLMHeadModel) -> None:
    free = generated(model, PROMPTS[:1], do_sample=False, stop_words_ids=[])[0]
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=NEW_TOKENS,
        eos_token_id=ENDOFTEXT_ID,
        pad_token_id=ENDOFTEXT_ID,
        stop_words_ids=[free[6:8]],
    )
    inputs = torch.tensor(PROMPTS[:1])
    from_config = model.generate(inputs, generation_config=config)[0, 5:].tolist()
    assert from_config == stopped_after(free, [free[6:8]])
    given = model.generate(inputs, generation_config=config, stop_words_ids=[free[2:4]])[0, 5:].tolist()
    assert given == stopped_after(free, [free[2:4]])  # the argument replaces the field


def test_a_prompt_ending_with_a_stop_sequence_stops_nothing(model: QWenLMHeadModel) -> None:
    free = generated(model, PROMPTS[:1], do_sample=False, stop_words_ids=[])[0]
    result = generated(model, PROMPTS[:1], do_sample=False, stop_words_ids=[PROMPTS[0][-2:]])[0]
    assert result == free


def test_processor_forces_the_first_eos_id_and_skips_eos_only_sequences() -> None:
    processor = StopWordsLogitsProcessor([[7], [3, 4], [9]], eos_token_id=[9, 8])
    assert processor.sequences == [[7], [3, 4]]
    scores = torch.zeros(3, 12)
    processor(torch.tensor([[1, 2], [1, 2], [1, 2]]), scores)  # the prompt: nothing generated yet
    forced = processor(torch.tensor([[1, 2, 3, 4], [1, 2, 4, 3], [1, 2, 5, 7]]), scores)
    assert forced[1].tolist() == [0.0] * 12
    for row in (0, 2):
        assert forced[row, 9] == 0 and bool(torch.isinf(forced[row]).sum() == 11)


@pytest.mark.parametrize(
    ("stop_words_ids", "message"),
    [([[]], r"stop_words_ids\[0\]"), ([[1], "ab"], r"stop_words_ids\[1\]"), (5, "a list of token-id lists")],
)
def test_malformed_stop_words_are_refused(model: QWenLMHeadModel, stop_words_ids, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        generated(model, PROMPTS[:1], do_sample=False, stop_words_ids=stop_words_ids)


def test_stop_words_need_an_end_of_text_id() -> None:
    with pytest.raises(ValueError, match="eos_token_id"):
        StopWordsLogitsProcessor([[1, 2]], eos_token_id=None)

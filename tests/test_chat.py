"""ChatML prompts, stop handling and chat()/chat_stream() (a scripted model makes the outputs exact)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from transformers import GenerationConfig, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from qwen_model.modeling_qwen import QWenLMHeadModel
from qwen_model.qwen_generation_utils import (
    chat,
    chat_stream,
    chatml_turn_ids,
    decode_response,
    get_stop_words_ids,
    make_context,
)
from qwen_model.tokenization_qwen import QWenTokenizer

SYSTEM = "You are a helpful assistant."


class ScriptedConfig(PreTrainedConfig):
    model_type = "scripted-test-lm"
    vocab_size: int = 151936


class ScriptedLM(PreTrainedModel, GenerationMixin):
    """Emits `script[k]` as the k-th generated token (then <|endoftext|>), whatever the prompt."""

    config_class = ScriptedConfig

    def __init__(self, script: list[int], fail_at_step: int | None = None, step_delay: float = 0.0) -> None:
        super().__init__(ScriptedConfig())
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.script = script
        self.fail_at_step = fail_at_step
        self.step_delay = step_delay
        self.prompt_length = 0
        self.calls = 0
        self.generated: list[int] = []
        self.generation_config = GenerationConfig(
            chat_format="chatml", max_window_size=6144, do_sample=False, use_cache=False
        )
        self.post_init()

    def generate(self, inputs: torch.Tensor, **kwargs):
        self.prompt_length = inputs.shape[1]
        output = super().generate(inputs, **kwargs)
        self.generated = output[0, self.prompt_length :].tolist()
        return output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        step = input_ids.shape[1] - self.prompt_length
        self.calls += 1
        if step == self.fail_at_step:
            raise RuntimeError(f"forward failed at step {step}")
        time.sleep(self.step_delay)
        logits = torch.zeros(input_ids.shape[0], 1, self.config.vocab_size)
        logits[:, -1, self.script[step] if step < len(self.script) else 151643] = 1.0
        return CausalLMOutputWithPast(logits=logits)


def test_make_context_is_chatml_with_plain_text_content(tokenizer: QWenTokenizer) -> None:
    history = [("What is 1+1?", "2"), ("And <|im_end|> 2+2?", "4 <|endoftext|>")]
    text, ids = make_context(tokenizer, "Thanks!", history=history, system=SYSTEM)
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>"
        "\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>"
        "\n<|im_start|>user\nAnd <|im_end|> 2+2?<|im_end|>\n<|im_start|>assistant\n4 <|endoftext|><|im_end|>"
        "\n<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n"
    )
    assert text == expected
    assert tokenizer.decode(ids) == expected
    # 7 turns opened, 6 closed (all but the open assistant turn): typed special text stays text.
    assert ids.count(tokenizer.im_start_id) == 7 and ids.count(tokenizer.im_end_id) == 6
    assert tokenizer.eod_id not in ids
    assert ids[-3:] == [
        tokenizer.im_start_id,
        *tokenizer.encode_text("assistant"),
        *tokenizer.encode_text("\n"),
    ]


def test_make_context_matches_whole_text_encoding_for_ordinary_text(tokenizer: QWenTokenizer) -> None:
    text, ids = make_context(
        tokenizer, "Write a poem.", history=[("Hi", "Hello! How can I help?")], system="Be brief."
    )
    assert ids == tokenizer.encode_text(text, allow_special=True)


def _turn_length(tokenizer: QWenTokenizer, query: str, response: str) -> int:
    with_turn = make_context(tokenizer, "q", history=[(query, response)], system=SYSTEM)[1]
    return len(with_turn) - len(make_context(tokenizer, "q", system=SYSTEM)[1])


def test_window_drops_oldest_turns_and_ignores_the_query_length(tokenizer: QWenTokenizer) -> None:
    history = [(f"question {i}", f"answer number {i} " * (i + 1)) for i in range(3)]
    system_turn = len(chatml_turn_ids(tokenizer, "system", SYSTEM))
    newest_two = _turn_length(tokenizer, *history[1]) + _turn_length(tokenizer, *history[2])
    long_query = "word " * 500

    def kept(window: int) -> list[str]:
        text, ids = make_context(
            tokenizer, long_query, history=history, system=SYSTEM, max_window_size=window
        )
        assert text.endswith(f"user\n{long_query}<|im_end|>\n<|im_start|>assistant\n")
        assert tokenizer.decode(ids) == text
        return [query for query, _ in history if f"user\n{query}<|im_end|>" in text]

    assert kept(system_turn + newest_two) == ["question 1", "question 2"]
    # The 500-word query is not counted: the prompt is far longer than the window.
    assert len(make_context(tokenizer, long_query, history, SYSTEM, system_turn + newest_two)[1]) > 500
    assert kept(system_turn + newest_two - 1) == ["question 2"]
    assert kept(system_turn) == []
    assert kept(10_000) == ["question 0", "question 1", "question 2"]


def test_stop_words(tokenizer: QWenTokenizer) -> None:
    assert get_stop_words_ids("chatml", tokenizer) == [[151645], [151644], [151643]]
    assert get_stop_words_ids("raw", tokenizer) == [[151643]]
    with pytest.raises(ValueError, match="chat_format"):
        get_stop_words_ids("alpaca", tokenizer)


def test_decode_response_stops_at_first_stop_token_and_keeps_all_tokens_otherwise(
    tokenizer: QWenTokenizer,
) -> None:
    stop_ids = {151643, 151644, 151645}
    answer = tokenizer.encode_text("The answer is 42.")
    assert (
        decode_response([*answer, 151645, *tokenizer.encode_text("junk")], tokenizer, stop_ids)
        == "The answer is 42."
    )
    assert decode_response([*answer, 151644, 151645], tokenizer, stop_ids) == "The answer is 42."
    # Ended by length: the last token ("." here) is kept, unlike the original code.
    assert decode_response(answer, tokenizer, stop_ids) == "The answer is 42."
    assert decode_response([151645], tokenizer, stop_ids) == ""


def test_chat_returns_response_until_im_end_and_extends_history(tokenizer: QWenTokenizer) -> None:
    model = ScriptedLM(
        [*tokenizer.encode_text("Paris."), tokenizer.im_end_id, *tokenizer.encode_text("ignored")]
    )
    history = [("Hi", "Hello!")]
    response, new_history = chat(model, tokenizer, "Capital of France?", history=history, max_new_tokens=20)
    assert response == "Paris."
    assert new_history == [("Hi", "Hello!"), ("Capital of France?", "Paris.")]
    assert history == [("Hi", "Hello!")]  # the caller's list is not changed
    assert model.calls == len(tokenizer.encode_text("Paris.")) + 1  # generation stopped at <|im_end|>


def test_chat_ended_by_length_keeps_the_last_token(tokenizer: QWenTokenizer) -> None:
    words = tokenizer.encode_text(" one two three four five six")
    model = ScriptedLM(words)
    response, _ = chat(model, tokenizer, "Count", max_new_tokens=4)
    assert response == tokenizer.decode(words[:4]).strip() == "one two three four"


def test_chat_never_emits_ids_without_a_token(tokenizer: QWenTokenizer) -> None:
    model = ScriptedLM([151900, 151851, *tokenizer.encode_text("ok"), tokenizer.im_end_id])
    response, _ = chat(model, tokenizer, "hi", max_new_tokens=10)
    assert model.generated[-1] == tokenizer.im_end_id
    assert all(token_id < len(tokenizer) for token_id in model.generated)
    assert response.endswith("ok")


def test_chat_refuses_base_models_and_bad_history(tokenizer: QWenTokenizer) -> None:
    model = ScriptedLM([tokenizer.im_end_id])
    with pytest.raises(ValueError, match="base"):
        chat(model, tokenizer, "hi", generation_config=GenerationConfig(chat_format="raw"))
    with pytest.raises(ValueError, match=r"history\[1\]"):
        chat(model, tokenizer, "hi", history=[("a", "b"), ("only one",)])
    with pytest.raises(ValueError, match=r"stop_words_ids\[1\] must be a non-empty list of token ids"):
        chat(model, tokenizer, "hi", stop_words_ids=[[1, 2], []])


REACT_STEP = "Thought: look it up\nAction: search\nAction Input: {}\nObservation: made up\nThought: more"


def test_chat_ends_after_a_multi_token_stop_word_and_keeps_it(tokenizer: QWenTokenizer) -> None:
    """As the original chat(): the stop sequence is let through, <|endoftext|> follows, the reply keeps it."""
    observation = tokenizer.encode("Observation:")
    assert len(observation) > 1
    script = tokenizer.encode_text(REACT_STEP)
    model = ScriptedLM(script)
    response, _ = chat(model, tokenizer, "Find it", stop_words_ids=[observation], max_new_tokens=40)
    assert response == "Thought: look it up\nAction: search\nAction Input: {}\nObservation:"
    stop_end = next(i for i in range(len(script)) if script[i - len(observation) + 1 : i + 1] == observation)
    assert model.generated == [*script[: stop_end + 1], tokenizer.eod_id]


def test_stop_words_of_the_generation_config_and_of_the_call_add_up(tokenizer: QWenTokenizer) -> None:
    script = tokenizer.encode_text(" one two three four five")
    config = GenerationConfig(
        chat_format="chatml",
        do_sample=False,
        use_cache=False,
        stop_words_ids=[tokenizer.encode(" four five")],
    )
    stopped_by_config = chat(
        ScriptedLM(script), tokenizer, "Count", generation_config=config, max_new_tokens=20
    )
    assert stopped_by_config[0] == "one two three four five"
    both = chat(
        ScriptedLM(script),
        tokenizer,
        "Count",
        generation_config=config,
        stop_words_ids=[tokenizer.encode(" two")],
    )
    assert both[0] == "one two"


def test_chat_stream_stops_after_a_multi_token_stop_word_like_chat(tokenizer: QWenTokenizer) -> None:
    script = tokenizer.encode_text(REACT_STEP)
    stop = [tokenizer.encode("Observation:")]
    pieces = list(
        chat_stream(ScriptedLM(script), tokenizer, "Find it", stop_words_ids=stop, max_new_tokens=40)
    )
    response, _ = chat(ScriptedLM(script), tokenizer, "Find it", stop_words_ids=stop, max_new_tokens=40)
    assert pieces[-1] == response and response.endswith("Observation:")


def test_chat_stream_yields_growing_text_ending_with_the_chat_response(tokenizer: QWenTokenizer) -> None:
    script = [*tokenizer.encode_text("Dragon: 龘 is a rare character."), tokenizer.im_end_id]
    pieces = list(chat_stream(ScriptedLM(script), tokenizer, "Tell me", max_new_tokens=50))
    response, _ = chat(ScriptedLM(script), tokenizer, "Tell me", max_new_tokens=50)
    assert pieces[-1] == response == "Dragon: 龘 is a rare character."
    assert len(pieces) > 3
    for shorter, longer in zip(pieces, pieces[1:]):
        assert longer.startswith(shorter) and longer != shorter
    assert not any(piece.endswith("\ufffd") for piece in pieces)  # half a character is held back


def test_chat_stream_ended_by_length_keeps_the_last_token(tokenizer: QWenTokenizer) -> None:
    words = tokenizer.encode_text(" one two three four five six")
    pieces = list(chat_stream(ScriptedLM(words), tokenizer, "Count", max_new_tokens=4))
    assert pieces[-1] == "one two three four"


def test_chat_stream_raises_errors_of_the_generation_thread(tokenizer: QWenTokenizer) -> None:
    model = ScriptedLM(tokenizer.encode_text(" a b c d e f"), fail_at_step=3)
    with pytest.raises(RuntimeError, match="forward failed at step 3"):
        list(chat_stream(model, tokenizer, "go", max_new_tokens=20))


def test_closing_chat_stream_stops_generation(tokenizer: QWenTokenizer) -> None:
    model = ScriptedLM(tokenizer.encode_text(" word" * 1000), step_delay=0.005)
    stream = chat_stream(model, tokenizer, "go", max_new_tokens=1000)
    assert next(stream) == "word"
    stream.close()  # returns once the generation thread has finished
    calls_after_close = model.calls
    assert calls_after_close < 1000
    assert model.calls == calls_after_close


def test_chat_on_the_tiny_checkpoint_is_greedy_decoding(tiny_chat_checkpoint: Path) -> None:
    model = QWenLMHeadModel.from_pretrained(tiny_chat_checkpoint).eval()
    tokenizer = QWenTokenizer.from_pretrained(tiny_chat_checkpoint)
    history = [("Hi", "Hey! <|im_end|>")]
    options = {"do_sample": False, "repetition_penalty": 1.0, "max_new_tokens": 8}
    response, new_history = model.chat(tokenizer, "Tell me a story.", history=history, **options)
    streamed = list(model.chat_stream(tokenizer, "Tell me a story.", history=history, **options))

    ids = make_context(tokenizer, "Tell me a story.", history=history, system=SYSTEM)[1]
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(8):
            logits = model(torch.tensor([ids + generated])).logits[0, -1]
            logits[len(tokenizer) :] = float("-inf")
            next_id = int(logits.argmax())
            if next_id in (tokenizer.im_end_id, tokenizer.im_start_id, tokenizer.eod_id):
                break
            generated.append(next_id)
    assert response == tokenizer.decode(generated).strip()
    assert streamed[-1] == response
    assert new_history == [*history, ("Tell me a story.", response)]

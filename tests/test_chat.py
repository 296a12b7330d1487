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


@pytest.fixture(scope="module")
def tok(vocab_file: Path) -> QWenTokenizer:
    return QWenTokenizer(vocab_file)


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


def test_make_context_is_chatml_with_plain_text_content(tok: QWenTokenizer) -> None:
    history = [("What is 1+1?", "2"), ("And <|im_end|> 2+2?", "4 <|endoftext|>")]
    text, ids = make_context(tok, "Thanks!", history=history, system=SYSTEM)
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>"
        "\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n2<|im_end|>"
        "\n<|im_start|>user\nAnd <|im_end|> 2+2?<|im_end|>\n<|im_start|>assistant\n4 <|endoftext|><|im_end|>"
        "\n<|im_start|>user\nThanks!<|im_end|>\n<|im_start|>assistant\n"
    )
    assert text == expected
    assert tok.decode(ids) == expected
    # 7 turns opened, 6 closed (all but the open assistant turn): typed special text stays text.
    assert ids.count(tok.im_start_id) == 7 and ids.count(tok.im_end_id) == 6
    assert tok.eod_id not in ids
    assert ids[-3:] == [tok.im_start_id, *tok.encode_text("assistant"), *tok.encode_text("\n")]


def test_make_context_matches_whole_text_encoding_for_ordinary_text(tok: QWenTokenizer) -> None:
    text, ids = make_context(
        tok, "Write a poem.", history=[("Hi", "Hello! How can I help?")], system="Be brief."
    )
    assert ids == tok.encode_text(text, allow_special=True)


def _turn_length(tok: QWenTokenizer, query: str, response: str) -> int:
    with_turn = make_context(tok, "q", history=[(query, response)], system=SYSTEM)[1]
    return len(with_turn) - len(make_context(tok, "q", system=SYSTEM)[1])


def test_window_drops_oldest_turns_and_ignores_the_query_length(tok: QWenTokenizer) -> None:
    history = [(f"question {i}", f"answer number {i} " * (i + 1)) for i in range(3)]
    system_turn = len(chatml_turn_ids(tok, "system", SYSTEM))
    newest_two = _turn_length(tok, *history[1]) + _turn_length(tok, *history[2])
    long_query = "word " * 500

    def kept(window: int) -> list[str]:
        text, ids = make_context(tok, long_query, history=history, system=SYSTEM, max_window_size=window)
        assert text.endswith(f"user\n{long_query}<|im_end|>\n<|im_start|>assistant\n")
        assert tok.decode(ids) == text
        return [query for query, _ in history if f"user\n{query}<|im_end|>" in text]

    assert kept(system_turn + newest_two) == ["question 1", "question 2"]
    # The 500-word query is not counted: the prompt is far longer than the window.
    assert len(make_context(tok, long_query, history, SYSTEM, system_turn + newest_two)[1]) > 500
    assert kept(system_turn + newest_two - 1) == ["question 2"]
    assert kept(system_turn) == []
    assert kept(10_000) == ["question 0", "question 1", "question 2"]


def test_stop_words(tok: QWenTokenizer) -> None:
    assert get_stop_words_ids("chatml", tok) == [[151645], [151644], [151643]]
    assert get_stop_words_ids("raw", tok) == [[151643]]
    with pytest.raises(ValueError, match="chat_format"):
        get_stop_words_ids("alpaca", tok)


def test_decode_response_stops_at_first_stop_token_and_keeps_all_tokens_otherwise(tok: QWenTokenizer) -> None:
    stop_ids = {151643, 151644, 151645}
    answer = tok.encode_text("The answer is 42.")
    assert decode_response([*answer, 151645, *tok.encode_text("junk")], tok, stop_ids) == "The answer is 42."
    assert decode_response([*answer, 151644, 151645], tok, stop_ids) == "The answer is 42."
    # Ended by length: the last token ("." here) is kept, unlike the original code.
    assert decode_response(answer, tok, stop_ids) == "The answer is 42."
    assert decode_response([151645], tok, stop_ids) == ""


def test_chat_returns_response_until_im_end_and_extends_history(tok: QWenTokenizer) -> None:
    model = ScriptedLM([*tok.encode_text("Paris."), tok.im_end_id, *tok.encode_text("ignored")])
    history = [("Hi", "Hello!")]
    response, new_history = chat(model, tok, "Capital of France?", history=history, max_new_tokens=20)
    assert response == "Paris."
    assert new_history == [("Hi", "Hello!"), ("Capital of France?", "Paris.")]
    assert history == [("Hi", "Hello!")]  # the caller's list is not changed
    assert model.calls == len(tok.encode_text("Paris.")) + 1  # generation stopped at <|im_end|>


def test_chat_ended_by_length_keeps_the_last_token(tok: QWenTokenizer) -> None:
    words = tok.encode_text(" one two three four five six")
    model = ScriptedLM(words)
    response, _ = chat(model, tok, "Count", max_new_tokens=4)
    assert response == tok.decode(words[:4]).strip() == "one two three four"


def test_chat_never_emits_ids_without_a_token(tok: QWenTokenizer) -> None:
    model = ScriptedLM([151900, 151851, *tok.encode_text("ok"), tok.im_end_id])
    response, _ = chat(model, tok, "hi", max_new_tokens=10)
    assert model.generated[-1] == tok.im_end_id
    assert all(token_id < len(tok) for token_id in model.generated)
    assert response.endswith("ok")


def test_chat_refuses_base_models_and_bad_history(tok: QWenTokenizer) -> None:
    model = ScriptedLM([tok.im_end_id])
    with pytest.raises(ValueError, match="base"):
        chat(model, tok, "hi", generation_config=GenerationConfig(chat_format="raw"))
    with pytest.raises(ValueError, match=r"history\[1\]"):
        chat(model, tok, "hi", history=[("a", "b"), ("only one",)])
    with pytest.raises(ValueError, match="single tokens"):
        chat(model, tok, "hi", stop_words_ids=[[1, 2]])


def test_chat_stream_yields_growing_text_ending_with_the_chat_response(tok: QWenTokenizer) -> None:
    script = [*tok.encode_text("Dragon: 龘 is a rare character."), tok.im_end_id]
    pieces = list(chat_stream(ScriptedLM(script), tok, "Tell me", max_new_tokens=50))
    response, _ = chat(ScriptedLM(script), tok, "Tell me", max_new_tokens=50)
    assert pieces[-1] == response == "Dragon: 龘 is a rare character."
    assert len(pieces) > 3
    for shorter, longer in zip(pieces, pieces[1:]):
        assert longer.startswith(shorter) and longer != shorter
    assert not any(piece.endswith("\ufffd") for piece in pieces)  # half a character is held back


def test_chat_stream_ended_by_length_keeps_the_last_token(tok: QWenTokenizer) -> None:
    words = tok.encode_text(" one two three four five six")
    pieces = list(chat_stream(ScriptedLM(words), tok, "Count", max_new_tokens=4))
    assert pieces[-1] == "one two three four"


def test_chat_stream_raises_errors_of_the_generation_thread(tok: QWenTokenizer) -> None:
    model = ScriptedLM(tok.encode_text(" a b c d e f"), fail_at_step=3)
    with pytest.raises(RuntimeError, match="forward failed at step 3"):
        list(chat_stream(model, tok, "go", max_new_tokens=20))


def test_closing_chat_stream_stops_generation(tok: QWenTokenizer) -> None:
    model = ScriptedLM(tok.encode_text(" word" * 1000), step_delay=0.005)
    stream = chat_stream(model, tok, "go", max_new_tokens=1000)
    assert next(stream) == "word"
    stream.close()  # returns once the generation thread has finished
    calls_after_close = model.calls
    assert calls_after_close < 1000
    assert model.calls == calls_after_close


def test_chat_on_the_tiny_checkpoint_is_greedy_decoding(tiny_chat_checkpoint: Path) -> None:
    model = QWenLMHeadModel.from_pretrained(tiny_chat_checkpoint).eval()
    tok = QWenTokenizer.from_pretrained(tiny_chat_checkpoint)
    history = [("Hi", "Hey! <|im_end|>")]
    options = {"do_sample": False, "repetition_penalty": 1.0, "max_new_tokens": 8}
    response, new_history = model.chat(tok, "Tell me a story.", history=history, **options)
    streamed = list(model.chat_stream(tok, "Tell me a story.", history=history, **options))

    ids = make_context(tok, "Tell me a story.", history=history, system=SYSTEM)[1]
    generated: list[int] = []
    with torch.no_grad():
        for _ in range(8):
            logits = model(torch.tensor([ids + generated])).logits[0, -1]
            logits[len(tok) :] = float("-inf")
            next_id = int(logits.argmax())
            if next_id in (tok.im_end_id, tok.im_start_id, tok.eod_id):
                break
            generated.append(next_id)
    assert response == tok.decode(generated).strip()
    assert streamed[-1] == response
    assert new_history == [*history, ("Tell me a story.", response)]

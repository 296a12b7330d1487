"""cli_demo.py / qwen-chat: answers are exactly what model.chat() returns, in every mode."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import torch

from qwen_finetune.chat_cli import main

MAX_NEW_TOKENS = 6
QUERY = "What is the capital of France?"


def expected_reply(
    model_dir: Path, query: str, seed: int, adapter: Path | None = None, history: list | None = None
) -> str:
    """model.chat() called directly, with the same seed and token budget as the command."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, set_seed

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = GenerationConfig.from_pretrained(model_dir)
    config.max_new_tokens = MAX_NEW_TOKENS
    set_seed(seed)
    response, _ = model.chat(tokenizer, query, history=history, generation_config=config)
    return response


def run_query(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main([*args, "--max_new_tokens", str(MAX_NEW_TOKENS)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def adapter_dir(tiny_chat_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_checkpoint)
    config = LoraConfig(
        r=4, target_modules=["c_attn", "w1", "w2"], init_lora_weights=False, task_type="CAUSAL_LM"
    )
    out = tmp_path_factory.mktemp("chat-adapter")
    get_peft_model(model, config).save_pretrained(out)
    return out


def test_query_prints_the_models_own_reply(
    tiny_chat_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run_query(capsys, "-c", str(tiny_chat_checkpoint), "--query", QUERY, "--seed", "3")
    assert code == 0
    expected = expected_reply(tiny_chat_checkpoint, QUERY, seed=3)
    assert expected and out == expected + "\n"


def test_adapter_reply_is_base_plus_adapter(
    tiny_chat_checkpoint: Path, adapter_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = expected_reply(tiny_chat_checkpoint, QUERY, seed=5, adapter=adapter_dir)
    assert expected != expected_reply(tiny_chat_checkpoint, QUERY, seed=5)  # the adapter matters
    code, out, _ = run_query(
        capsys, "-c", str(tiny_chat_checkpoint), "--adapter", str(adapter_dir), "--query", QUERY, "-s", "5"
    )
    assert (code, out) == (0, expected + "\n")
    # -c on the adapter directory alone finds the base through adapter_config.json
    code, out, _ = run_query(capsys, "-c", str(adapter_dir), "--query", QUERY, "-s", "5")
    assert (code, out) == (0, expected + "\n")


def test_interactive_session_streams_keeps_history_and_obeys_commands(
    tiny_chat_checkpoint: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = [
        "Hello",
        QUERY,
        ":history",
        ":conf max_new_tokens=3",
        ":conf",
        ":system Answer briefly.",
        ":history",
        ":seed 9",
        ":bogus",
        ":exit",
        "never read",
    ]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    code = main(["-c", str(tiny_chat_checkpoint), "--seed", "4", "--max_new_tokens", str(MAX_NEW_TOKENS)])
    out = capsys.readouterr().out
    assert code == 0
    first = expected_reply(tiny_chat_checkpoint, "Hello", seed=4)
    second = expected_reply(tiny_chat_checkpoint, QUERY, seed=4, history=[("Hello", first)])
    assert f"Qwen: {first}\n" in out and f"Qwen: {second}\n" in out  # streamed text == chat() reply
    assert f"[1] User: Hello\n[1] Qwen: {first}\n[2] User: {QUERY}\n[2] Qwen: {second}\n" in out
    assert '"max_new_tokens": 3' in out
    assert "system prompt set; history cleared" in out and "(no history)" in out
    assert "seed: 9" in out and "unknown command :bogus" in out


def test_base_model_is_refused_with_the_reason(
    tiny_base_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_query(capsys, "-c", str(tiny_base_checkpoint), "--query", QUERY)
    assert code == 1 and out == ""
    assert "base" in err and "chat_format" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-c", "{tmp}/missing"], "does not exist"),
        (["-c", "{tmp}"], "no config.json"),
        (["-c", "{ckpt}", "--adapter", "{tmp}"], "not a LoRA adapter"),
    ],
    ids=["missing", "not-a-model", "not-an-adapter"],
)
def test_bad_paths_give_a_clear_error(
    args: list[str],
    message: str,
    tiny_chat_checkpoint: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    filled = [arg.format(tmp=tmp_path, ckpt=tiny_chat_checkpoint) for arg in args]
    code, _, err = run_query(capsys, *filled, "--query", QUERY)
    assert code == 1 and message in err


def test_stop_words_of_any_length_end_the_reply(
    tiny_chat_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwen_model.qwen_generation_utils import make_context

    model = AutoModelForCausalLM.from_pretrained(tiny_chat_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_checkpoint)
    prompt = torch.tensor([make_context(tokenizer, QUERY)[1]])
    generated = model.generate(prompt, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, stop_words_ids=[])
    new_ids = generated[0, prompt.shape[1] :].tolist()
    start = next(
        i
        for i in range(1, 5)
        if tokenizer.encode_text(tokenizer.decode(new_ids[i : i + 2])) == new_ids[i : i + 2]
    )
    stop_word = tokenizer.decode(new_ids[start : start + 2])

    code, out, _ = run_query(
        capsys, "-c", str(tiny_chat_checkpoint), "--query", QUERY, "--greedy", "--stop_words", stop_word
    )
    expected, _ = model.chat(
        tokenizer,
        QUERY,
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
        stop_words_ids=[new_ids[start : start + 2]],
    )
    assert code == 0 and out == expected + "\n"
    assert expected == tokenizer.decode(new_ids[: start + 2]).strip()  # the reply ends with the stop word


def test_conf_refuses_settings_generation_cannot_use(capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import GenerationConfig

    from qwen_finetune.chat_cli import ChatSession, LoadedChatModel, run_command

    loaded = LoadedChatModel(None, None, GenerationConfig(do_sample=True, top_p=0.8, max_new_tokens=10), "m")
    session = ChatSession(loaded, system="s", seed=0)
    for line in (":conf top_p=high", ":conf do_sample=3", ":conf bogus=1", ":conf max_new_tokens=-2"):
        assert run_command(session, line)
    assert run_command(session, ":conf top_p=0.5")
    out = capsys.readouterr().out
    assert (
        out.count("not changed") == 4
        and "top_p takes a number" in out
        and "bogus is not a generation setting" in out
    )
    assert session.overrides == {"top_p": 0.5}

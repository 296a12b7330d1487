"""export_gguf.py: the GGUF file, run by the real llama.cpp (llama-cpp-python), computes what the PyTorch
model computes: same token ids, same logits, same greedy continuation, same chat prompt.

A random-init tiny model has near-flat logits (below 1, top-1 and top-2 within 1e-3 of each other), so
a greedy comparison would compare rounding noise and a 1e-3 logit tolerance would hide real errors.
The tests use the tiny chat checkpoint with every weight matrix scaled by WEIGHT_SCALE and the output
layer by a further OUTPUT_SCALE: logits then reach about 70 (float32 differences stay near 5e-5) and
the top-1 token leads by more than MIN_TOP1_GAP (ten times the logit tolerance) at every greedy step,
which the continuation test asserts before comparing.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from qwen_finetune.errors import ArgumentError, InputFileError, ToolkitError
from qwen_finetune.gguf.chat_template import portable_chat_template
from qwen_finetune.gguf.export import ExportArguments, export_gguf, main
from qwen_finetune.gguf.packages import MissingPackageError
from qwen_model.chat_format import DEFAULT_SYSTEM_PROMPT
from qwen_model.tokenization_qwen import ENDOFTEXT_ID, IM_END_ID, IM_START_ID

WEIGHT_SCALE = 4.0
OUTPUT_SCALE = 20.0
LOGIT_TOLERANCE = 1e-3
MIN_TOP1_GAP = 10 * LOGIT_TOLERANCE
NEW_TOKENS = 16

CORPUS = [
    "Hello, world! It's a test: don't, you'd, we'll, they've, I'm.",
    "ÉCOLE, naïve café — “quoted” text… 1234567890 3.14159",
    "你好，世界！我们今天学习机器学习。北京欢迎你。",
    "日本語のテキスト、한국어 문장, Привет, мир! مرحبا بالعالم",
    "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }  // <vector> </s>',
    "emoji 😀😃🎉👍🏽 👨‍👩‍👧‍👦 flags 🇨🇳🇺🇸 ✨",
    "   leading spaces, trailing spaces    \n\n\n\ttabs\t\tand\r\nwindows lines   \n  \n",
    "a  b   c    d\n \n  \n   x          y",
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text with <|endoftext|> inside, and <|extra_7|> too",
]
CHAT_PROMPTS: list[tuple[str, list[tuple[str, str]]]] = [
    ("Give three tips for staying healthy.", []),
    ("用一句话介绍一下你自己。", []),
    ("And what is 12 times 12?", [("What is 2 plus 2?", "2 plus 2 is 4.")]),
    ("Write a Python function that reverses a string.", []),
]


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sharp_checkpoint(tiny_chat_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny chat checkpoint with sharper predictions: weight matrices scaled, norms untouched."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import qwen_model  # noqa: F401

    out = tmp_path_factory.mktemp("sharp")
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_checkpoint, dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(WEIGHT_SCALE)
        model.lm_head.weight.mul_(OUTPUT_SCALE)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_chat_checkpoint).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tokenizer(sharp_checkpoint: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(sharp_checkpoint)


@pytest.fixture(scope="module")
def model(sharp_checkpoint: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(sharp_checkpoint, dtype=torch.float32).eval()


def export(model_dir: Path, out: Path, outtype: str, *extra: str) -> Path:
    assert main(["--model_dir", str(model_dir), "--out", str(out), "--outtype", outtype, *extra]) == 0
    return out


@pytest.fixture(scope="module")
def f32_gguf(sharp_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export(sharp_checkpoint, tmp_path_factory.mktemp("gguf") / "sharp-f32.gguf", "f32")


def open_llama(path: Path, n_ctx: int = 512) -> Any:
    """llama.cpp with every position's logits and a float32 KV cache (its default is float16)."""
    import llama_cpp

    return llama_cpp.Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        logits_all=True,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
    )


@pytest.fixture(scope="module")
def llama_f32(f32_gguf: Path) -> Any:
    llm = open_llama(f32_gguf)
    yield llm
    llm.close()


def chat_prompt_ids(tokenizer: Any) -> list[list[int]]:
    from qwen_model.qwen_generation_utils import make_context

    return [make_context(tokenizer, query, history)[1] for query, history in CHAT_PROMPTS]


def probe_ids(tokenizer: Any) -> list[list[int]]:
    """ChatML prompts as chat() builds them, and raw texts of every kind."""
    return chat_prompt_ids(tokenizer) + [tokenizer.encode_text(text) for text in CORPUS]


def llama_logits(llm: Any, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


@torch.no_grad()
def torch_logits(model: torch.nn.Module, ids: list[int]) -> np.ndarray:
    return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().numpy()


# ------------------------------------------------------------------------------ the f32 file in llama.cpp


@pytest.mark.slow
def test_llama_cpp_tokenizes_like_our_tokenizer(llama_f32: Any, tokenizer: Any) -> None:
    """Plain text (special-token text stays text) and with special tokens parsed, as chat prompts are.

    With special tokens parsed, llama.cpp also turns the text "</s>" into the vocabulary entry of that
    text (it treats any token spelled "</s>" as an end-of-generation control token); Qwen's
    pre-tokenizer never produces that entry, so texts holding "</s>" are compared as plain text only.
    """
    for text in CORPUS:
        plain = tokenizer.encode_text(text)
        assert llama_f32.tokenize(text.encode(), add_bos=False, special=False) == plain, text
        assert llama_f32.detokenize(plain).decode() == text
        if "</s>" not in text:
            parsed = tokenizer.encode_text(text, allow_special=True)
            assert llama_f32.tokenize(text.encode(), add_bos=False, special=True) == parsed, text
    chatml = next(text for text in CORPUS if text.startswith("<|im_start|>"))
    assert {IM_START_ID, IM_END_ID} <= set(tokenizer.encode_text(chatml, allow_special=True))


@pytest.mark.slow
def test_llama_cpp_logits_match_at_every_position(
    llama_f32: Any, model: torch.nn.Module, tokenizer: Any
) -> None:
    largest = 0.0
    for ids in probe_ids(tokenizer):
        reference = torch_logits(model, ids)
        difference = np.abs(llama_logits(llama_f32, ids) - reference).max()
        assert difference < LOGIT_TOLERANCE, (tokenizer.decode(ids), difference)
        largest = max(largest, float(np.abs(reference).max()))
    assert largest > 30  # sharpened: the tolerance is small against the logits compared


@torch.no_grad()
def torch_greedy(model: torch.nn.Module, ids: list[int], new_tokens: int) -> list[int]:
    """Our model's greedy continuation, decoded token by token through its KV cache."""
    output = model(input_ids=torch.tensor([ids]), use_cache=True)
    generated: list[int] = []
    while len(generated) < new_tokens:
        generated.append(int(output.logits[0, -1].argmax()))
        output = model(
            input_ids=torch.tensor([generated[-1:]]), past_key_values=output.past_key_values, use_cache=True
        )
    return generated


@pytest.mark.slow
def test_llama_cpp_greedy_continuation_matches(
    llama_f32: Any, model: torch.nn.Module, tokenizer: Any
) -> None:
    for ids in chat_prompt_ids(tokenizer) + [tokenizer.encode_text(CORPUS[0])]:
        ours = torch_greedy(model, ids, NEW_TOKENS)
        top2 = np.sort(torch_logits(model, ids + ours)[len(ids) - 1 : -1], axis=-1)[:, -2:]
        assert (top2[:, 1] - top2[:, 0]).min() > MIN_TOP1_GAP  # no near-ties: the comparison is meaningful
        stream = llama_f32.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)
        theirs = [token for token, _ in zip(stream, range(NEW_TOKENS))]
        assert theirs == ours, tokenizer.decode(ids)
        assert len(set(ours)) > NEW_TOKENS // 2  # a continuation, not one token repeated


def chat_completion_prompt(llm: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt ids llama-cpp-python's chat completion evaluates (seen by a logits processor)."""
    seen: list[list[int]] = []

    def record(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        seen.append(input_ids.tolist())
        return scores

    llm.reset()
    llm.create_chat_completion(messages=messages, max_tokens=1, logits_processor=[record])
    return seen[0]


@pytest.mark.slow
def test_llama_cpp_chat_completion_builds_the_prompt_chat_builds(llama_f32: Any, tokenizer: Any) -> None:
    """create_chat_completion renders the template embedded in the file; its prompt ids equal chat()'s."""
    from qwen_model.qwen_generation_utils import make_context

    for query, history in CHAT_PROMPTS:
        messages = [
            message
            for past_query, past_answer in history
            for message in (
                {"role": "user", "content": past_query},
                {"role": "assistant", "content": past_answer},
            )
        ]
        messages.append({"role": "user", "content": query})
        assert chat_completion_prompt(llama_f32, messages) == make_context(tokenizer, query, history)[1]
    system = "You answer in French."
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]
    assert chat_completion_prompt(llama_f32, messages) == make_context(tokenizer, "Hi", system=system)[1]


@pytest.mark.slow
def test_metadata_llama_cpp_reads(llama_f32: Any, tokenizer: Any, sharp_checkpoint: Path) -> None:
    config = json.loads((sharp_checkpoint / "config.json").read_text())
    metadata = llama_f32.metadata
    expected = {
        "general.architecture": "qwen",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.eos_token_id": str(ENDOFTEXT_ID),
        "tokenizer.ggml.eot_token_id": str(IM_END_ID),
        "tokenizer.ggml.add_bos_token": "false",
        "qwen.context_length": str(config["seq_length"]),
        "qwen.block_count": str(config["num_hidden_layers"]),
        "general.sampling.top_p": "0.800000",
        "general.sampling.penalty_repeat": "1.100000",
        "tokenizer.chat_template": portable_chat_template(tokenizer.chat_template),
    }
    assert {key: metadata.get(key) for key in expected} == expected
    assert llama_f32.n_vocab() == config["vocab_size"]


@pytest.mark.slow
def test_modelfile_beside_the_gguf(f32_gguf: Path) -> None:
    lines = f32_gguf.with_suffix(".Modelfile").read_text().splitlines()
    assert lines[0] == f"FROM ./{f32_gguf.name}"
    assert f'SYSTEM """{DEFAULT_SYSTEM_PROMPT}"""' in lines
    stops = [line for line in lines if line.startswith("PARAMETER stop ")]
    assert stops == [f'PARAMETER stop "{text}"' for text in ("<|im_end|>", "<|im_start|>", "<|endoftext|>")]
    assert "PARAMETER top_p 0.8" in lines and "PARAMETER num_ctx 2048" in lines


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TEMPLATE_CONVERSATIONS: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = [
    (
        [
            {"role": "user", "content": "What is 2 plus 2?"},
            {"role": "assistant", "content": "  4, with spaces\n"},
            {"role": "user", "content": "And 3 plus 3?"},
        ],
        None,
    ),
    (
        [
            {"role": "system", "content": "You check the weather."},
            {"role": "user", "content": "Is it raining in Paris?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
                ],
            },
            {"role": "tool", "content": '{"rain": true, "celsius": 12}'},
            {"role": "assistant", "content": "Yes, it is raining (12 °C)."},
            {"role": "user", "content": "And in Rome?"},
        ],
        [WEATHER_TOOL],
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("messages", "tools"), TEMPLATE_CONVERSATIONS, ids=["chat", "tools"])
def test_embedded_template_renders_in_llama_cpp_python_as_in_transformers(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> None:
    """The template written to the file (generation markers as plain blocks), rendered by the Jinja
    environment llama-cpp-python's chat completion uses, gives the checkpoint template's prompt."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    portable = portable_chat_template(tokenizer.chat_template)
    assert "generation %}" not in portable
    expected = tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )
    formatter = Jinja2ChatFormatter(template=portable, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    assert formatter(messages=messages, tools=tools).prompt == expected
    for add_generation_prompt in (False, True):
        rendered = [
            tokenizer.apply_chat_template(
                messages,
                tools=tools,
                chat_template=template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
            )
            for template in (tokenizer.chat_template, portable)
        ]
        assert rendered[0] == rendered[1]


# ------------------------------------------------------------------------------- other types, adapters


@pytest.mark.slow
def test_q8_0_keeps_the_top_token(
    sharp_checkpoint: Path, f32_gguf: Path, model: torch.nn.Module, tokenizer: Any, tmp_path: Path
) -> None:
    path = export(sharp_checkpoint, tmp_path / "sharp-q8_0.gguf", "q8_0")
    assert path.stat().st_size < 0.35 * f32_gguf.stat().st_size  # 34 bytes per 32 weights instead of 128
    llm = open_llama(path)
    assert llm.metadata["general.file_type"] == "7"  # llama.cpp's MOSTLY_Q8_0
    agreeing = positions = 0
    for ids in probe_ids(tokenizer):
        agreeing += int((llama_logits(llm, ids).argmax(-1) == torch_logits(model, ids).argmax(-1)).sum())
        positions += len(ids)
    llm.close()
    assert agreeing / positions >= 0.9, (
        f"top-1 agreement {agreeing / positions:.3f} over {positions} positions"
    )


def make_adapter(base_dir: Path, out_dir: Path) -> Path:
    """A LoRA adapter with a non-zero update (random B) and retrained embeddings."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_proj", "w1", "w2"],
        modules_to_save=["wte", "lm_head"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(torch.randn_like(parameter))
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.mark.slow
def test_adapter_is_merged_on_the_fly(
    sharp_checkpoint: Path, model: torch.nn.Module, tokenizer: Any, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(sharp_checkpoint, tmp_path / "adapter")
    adapter_files = sorted(path.name for path in adapter.iterdir())
    path = export(sharp_checkpoint, tmp_path / "merged-f32.gguf", "f32", "--adapter_dir", str(adapter))
    assert sorted(path.name for path in adapter.iterdir()) == adapter_files
    base = AutoModelForCausalLM.from_pretrained(sharp_checkpoint, dtype=torch.float32)
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()
    llm = open_llama(path)
    for ids in chat_prompt_ids(tokenizer):
        expected = torch_logits(with_adapter, ids)
        assert np.abs(llama_logits(llm, ids) - expected).max() < LOGIT_TOLERANCE
        assert np.abs(torch_logits(model, ids) - expected).max() > 1.0  # the adapter does change the model
    llm.close()


@pytest.mark.slow
def test_verify_flag_checks_the_file_in_llama_cpp(
    sharp_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export(sharp_checkpoint, tmp_path / "checked.gguf", "f16", "--verify")
    printed = capsys.readouterr().out
    assert (
        "same top-1 token at" in printed
        and "llama.cpp answers 'Give three tips for staying healthy.'" in printed
    )


# ---------------------------------------------------------------------------------------------- errors


@pytest.mark.slow
def test_existing_output_is_kept_unless_overwrite(sharp_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "model.gguf"
    out.write_bytes(b"old")
    arguments = ExportArguments(model_dir=str(sharp_checkpoint), out=str(out), outtype="f16")
    with pytest.raises(ArgumentError, match="already exists; pass --overwrite"):
        export_gguf(arguments)
    assert out.read_bytes() == b"old" and not out.with_suffix(".Modelfile").exists()
    arguments.overwrite = True
    export_gguf(arguments)
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.slow
def test_failed_export_leaves_nothing_behind(
    sharp_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import qwen_finetune.gguf.writer as writer_module

    def fail(tensor: torch.Tensor, qtype: Any) -> np.ndarray:
        raise ToolkitError("disk full (simulated)")

    monkeypatch.setattr(writer_module, "encode_tensor", fail)
    with pytest.raises(ToolkitError, match="simulated"):
        export_gguf(
            ExportArguments(model_dir=str(sharp_checkpoint), out=str(tmp_path / "m.gguf"), outtype="f32")
        )
    assert list(tmp_path.iterdir()) == []


def test_gptq_checkpoint_is_refused_with_the_way_to_a_float_one(
    tiny_chat_checkpoint: Path, tmp_path: Path
) -> None:
    gptq = tmp_path / "int4"
    shutil.copytree(tiny_chat_checkpoint, gptq)
    config = json.loads((gptq / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (gptq / "config.json").write_text(json.dumps(config))
    (gptq / "quantize_report.json").write_text(json.dumps({"source_model": str(tiny_chat_checkpoint)}))
    with pytest.raises(ArgumentError) as error:
        export_gguf(ExportArguments(model_dir=str(gptq), out=str(tmp_path / "m.gguf"), outtype="f16"))
    message = str(error.value)
    assert "gptq" in message and str(tiny_chat_checkpoint) in message and "merge_lora.py" in message
    assert not (tmp_path / "m.gguf").exists()


def test_missing_vocabulary_is_named(tiny_chat_checkpoint: Path, tmp_path: Path) -> None:
    incomplete = tmp_path / "no-vocab"
    shutil.copytree(tiny_chat_checkpoint, incomplete)
    (incomplete / "qwen.tiktoken").unlink()
    with pytest.raises(InputFileError, match="qwen.tiktoken"):
        export_gguf(ExportArguments(model_dir=str(incomplete), out=str(tmp_path / "m.gguf"), outtype="f16"))


@pytest.mark.parametrize(("package", "flags"), [("gguf", []), ("llama_cpp", ["--verify"])])
def test_missing_package_says_how_to_install(
    package: str,
    flags: list[str],
    tiny_chat_checkpoint: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setitem(sys.modules, package, None)  # import raises ImportError
    out = tmp_path / "m.gguf"
    assert (
        main(["--model_dir", str(tiny_chat_checkpoint), "--out", str(out), "--outtype", "f16", *flags]) == 1
    )
    printed = capsys.readouterr().err
    assert f"{package!r}, which is not installed: pip install" in printed and "Traceback" not in printed
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MissingPackageError):
        export_gguf(
            ExportArguments(model_dir=str(tiny_chat_checkpoint), out=str(out), outtype="f16", verify=True)
        )


# ---------------------------------------------------------------------- the pieces, without llama.cpp


def test_merges_replay_bpe_on_the_token_bytes() -> None:
    from qwen_finetune.gguf.vocab import last_merge

    singles = {b"a": 0, b"b": 1, b"c": 2}
    assert last_merge(b"abc", {**singles, b"ab": 3, b"bc": 4, b"abc": 5}) == (b"ab", b"c")
    assert last_merge(b"abc", {**singles, b"bc": 3, b"ab": 4, b"abc": 5}) == (b"a", b"bc")


def test_a_vocabulary_bpe_cannot_build_is_refused() -> None:
    from qwen_finetune.gguf.vocab import VocabularyError, last_merge

    with pytest.raises(VocabularyError, match="cannot be built from two lower-ranked tokens"):
        last_merge(b"abc", {b"a": 0, b"b": 1, b"c": 2, b"abc": 3, b"bc": 4})


def test_every_embedding_row_gets_a_token(vocab_file: Path) -> None:
    from gguf import TokenType

    from qwen_finetune.gguf.vocab import build_vocabulary, tokenizer_ranks
    from qwen_model.tokenization_qwen import QWenTokenizer

    ranks = tokenizer_ranks(QWenTokenizer(vocab_file))
    vocabulary = build_vocabulary(ranks, 151936)
    assert len(vocabulary.tokens) == len(vocabulary.token_types) == 151936
    assert vocabulary.tokens[ENDOFTEXT_ID] == "<|endoftext|>" and vocabulary.tokens[198] == "Ċ"  # "\n"
    assert vocabulary.token_types[IM_END_ID] == TokenType.CONTROL
    assert vocabulary.token_types[198] == TokenType.NORMAL
    assert vocabulary.tokens[-1] == "[PAD151935]" and vocabulary.token_types[-1] == TokenType.UNUSED
    assert len(vocabulary.merges) == sum(len(token) > 1 for token in ranks)
    assert vocabulary.merges[0] == "Ġ Ġ"  # the lowest-ranked merge first: two spaces


def test_stop_texts_include_the_checkpoints_multi_token_stop_words(vocab_file: Path) -> None:
    from qwen_finetune.gguf.export import stop_texts
    from qwen_model.tokenization_qwen import QWenTokenizer

    tokenizer = QWenTokenizer(vocab_file)
    observation = tokenizer.encode_text("Observation:")
    generation_config = {"stop_words_ids": [[IM_END_ID], observation]}
    assert stop_texts(tokenizer, generation_config, chat=True) == [
        "<|im_end|>",
        "<|im_start|>",
        "<|endoftext|>",
        "Observation:",
    ]
    assert stop_texts(tokenizer, {}, chat=False) == ["<|endoftext|>"]


def test_base_model_modelfile_keeps_the_raw_prompt() -> None:
    from qwen_finetune.gguf.metadata import sampling_defaults
    from qwen_finetune.gguf.modelfile import render_modelfile

    greedy = sampling_defaults({"do_sample": False, "repetition_penalty": 1.05})
    text = render_modelfile(
        Path("base-f16.gguf"),
        chat=False,
        system_prompt=DEFAULT_SYSTEM_PROMPT,
        stop_texts=["<|endoftext|>"],
        sampling=greedy,
        context_length=8192,
    )
    assert text.splitlines() == [
        "FROM ./base-f16.gguf",
        'PARAMETER stop "<|endoftext|>"',
        "PARAMETER temperature 0",
        "PARAMETER top_k 1",
        "PARAMETER top_p 1",
        "PARAMETER repeat_penalty 1.05",
        "PARAMETER repeat_last_n -1",
        "PARAMETER num_ctx 8192",
    ]


def test_a_tokenizer_without_chat_template_is_refused() -> None:
    from types import SimpleNamespace

    from qwen_finetune.gguf.chat_template import tokenizer_chat_template

    with pytest.raises(InputFileError, match="has no chat template"):
        tokenizer_chat_template(SimpleNamespace(chat_template=None), "some/checkpoint")


def test_unknown_tensor_and_unsupported_layout_are_refused() -> None:
    from types import SimpleNamespace

    from qwen_finetune.gguf.tensors import UnsupportedCheckpointError, check_architecture, gguf_tensor_name

    assert gguf_tensor_name("transformer.h.3.mlp.w1.weight") == "blk.3.ffn_up.weight"
    assert gguf_tensor_name("transformer.h.3.mlp.w2.weight") == "blk.3.ffn_gate.weight"
    assert gguf_tensor_name("transformer.h.0.attn.c_attn.bias") == "blk.0.attn_qkv.bias"
    with pytest.raises(UnsupportedCheckpointError, match="transformer.h.0.mlp.qweight"):
        gguf_tensor_name("transformer.h.0.mlp.qweight")
    config = SimpleNamespace(
        num_attention_heads=4, kv_channels=32, hidden_size=64, no_bias=False, tie_word_embeddings=False
    )
    with pytest.raises(UnsupportedCheckpointError, match="kv_channels .* no_bias is false"):
        check_architecture(config)

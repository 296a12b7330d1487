"""Checkpoints we write: official layout, deterministic, and loadable without our packages installed."""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from qwen_model.chat_format import CHAT_TEMPLATE
from qwen_model.configuration_qwen import QWenConfig
from qwen_model.modeling_qwen import QWenLMHeadModel
from qwen_model.portable import FLAT_MODEL_FILES, write_portable_code
from qwen_model.qwen_generation_utils import chat, make_context
from qwen_model.tiny import build_tiny_checkpoint, tiny_config
from qwen_model.tokenization_qwen import QWenTokenizer

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "qwen_model"
TEXT = "Portable <|im_start|>check: 你好, world! 12345"


def _weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    index = json.loads((checkpoint / "model.safetensors.index.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(checkpoint / shard))
    return tensors


def test_tiny_checkpoint_has_the_official_layout(tiny_chat_checkpoint: Path) -> None:
    names = {path.name for path in tiny_chat_checkpoint.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "qwen.tiktoken"} <= names
    assert {"tokenizer_config.json", *FLAT_MODEL_FILES} <= names
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"} <= names

    config = json.loads((tiny_chat_checkpoint / "config.json").read_text())
    assert config["model_type"] == "qwen" and config["architectures"] == ["QWenLMHeadModel"]
    assert config["auto_map"] == {
        "AutoConfig": "configuration_qwen.QWenConfig",
        "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
    }
    assert (config["vocab_size"], config["hidden_size"], config["fp32"]) == (151936, 64, True)
    assert set(QWenConfig.__annotations__) <= set(config)  # every QWenConfig field is written

    weights = _weights(tiny_chat_checkpoint)
    assert weights["transformer.wte.weight"].shape == (151936, 64)
    assert weights["lm_head.weight"].shape == (151936, 64)
    assert weights["transformer.h.1.attn.c_attn.bias"].shape == (3 * 4 * 16,)
    assert weights["transformer.h.0.mlp.w1.weight"].shape == (128, 64)
    assert all(tensor.dtype == torch.float32 for tensor in weights.values())

    generation = GenerationConfig.from_pretrained(tiny_chat_checkpoint)
    assert generation.chat_format == "chatml"
    assert (generation.eos_token_id, generation.pad_token_id) == (151643, 151643)
    assert [151645] in generation.stop_words_ids


def test_auto_classes_load_our_local_classes_without_remote_code(tiny_chat_checkpoint: Path) -> None:
    import qwen_model  # registers the classes with the Auto factories

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_checkpoint)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_checkpoint)
    assert type(tokenizer) is qwen_model.QWenTokenizer
    assert type(model) is qwen_model.QWenLMHeadModel
    assert tokenizer.model_max_length == 2048 and tokenizer.pad_token_id == 151643


def test_base_checkpoint_differs_only_by_its_chat_format(
    tiny_chat_checkpoint: Path, tiny_base_checkpoint: Path
) -> None:
    generation = GenerationConfig.from_pretrained(tiny_base_checkpoint)
    assert generation.chat_format == "raw"
    assert not hasattr(generation, "max_window_size")
    chat_weights, base_weights = _weights(tiny_chat_checkpoint), _weights(tiny_base_checkpoint)
    assert all(torch.equal(chat_weights[name], base_weights[name]) for name in chat_weights)


def test_same_seed_same_weights_other_seed_other_weights(tiny_chat_checkpoint: Path, tmp_path: Path) -> None:
    again = _weights(build_tiny_checkpoint(tmp_path / "again", seed=0))
    other = _weights(build_tiny_checkpoint(tmp_path / "other", seed=1))
    reference = _weights(tiny_chat_checkpoint)
    assert all(torch.equal(reference[name], again[name]) for name in reference)
    assert not torch.equal(reference["transformer.wte.weight"], other["transformer.wte.weight"])


def test_small_size_is_about_100m_parameters() -> None:
    config = tiny_config("small")
    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    assert 90e6 < sum(parameter.numel() for parameter in model.parameters()) < 120e6
    assert config.bf16 and not config.fp32


def test_write_portable_code_copies_files_and_merges_auto_maps(tmp_path: Path, vocab_file: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        write_portable_code(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "qwen", "auto_map": {"AutoModel": "x.Y"}})
    )
    QWenTokenizer(vocab_file).save_pretrained(tmp_path)
    write_portable_code(tmp_path)
    for name in FLAT_MODEL_FILES:
        assert filecmp.cmp(tmp_path / name, PACKAGE_DIR / name, shallow=False)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "x.Y"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen.QWenLMHeadModel"
    tokenizer_config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert tokenizer_config["auto_map"] == {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}


# Runs with `python -S` (no .pth files, so not even the editable install of qwen_model) plus the
# site-packages directory, from a directory that holds nothing of ours.
REMOTE_CODE_SCRIPT = """
import importlib.util, sys
sys.path.append(sys.argv[3])
assert importlib.util.find_spec("qwen_model") is None, "qwen_model must not be importable here"
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

checkpoint, out = sys.argv[1], sys.argv[2]
torch.set_num_threads(1)
tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
ids = tokenizer.encode(sys.argv[4])
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits
response, _ = model.chat(tokenizer, "Hi there", do_sample=False, max_new_tokens=6)
chat = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
templated = tokenizer.apply_chat_template(chat, return_dict=True, return_assistant_tokens_mask=True)
# A tokenizer directory as released: no chat template of its own.
official = AutoTokenizer.from_pretrained(sys.argv[5], trust_remote_code=True)
torch.save(
    {
        "ids": ids,
        "template": tokenizer.chat_template,
        "official_template": official.chat_template,
        "templated": dict(templated),
        "official_prompt": official.apply_chat_template(chat[:1], add_generation_prompt=True, return_dict=False),
        "logits": logits,
        "response": response,
        "modules": [type(model).__module__, type(tokenizer).__module__, type(model.config).__module__],
        "qwen_model_loaded": any(name.split(".")[0] == "qwen_model" for name in sys.modules),
    },
    out,
)
"""


@pytest.mark.slow
def test_checkpoint_loads_with_remote_code_only(tmp_path: Path, vocab_file: Path) -> None:
    checkpoint = tmp_path / "checkpoint"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = QWenLMHeadModel(tiny_config("tiny")).eval()
    model.save_pretrained(checkpoint)
    tokenizer = QWenTokenizer(vocab_file)
    tokenizer.save_pretrained(checkpoint)
    assert "auto_map" not in json.loads((checkpoint / "config.json").read_text())
    write_portable_code(checkpoint)
    official = tmp_path / "official-tokenizer"
    official.mkdir()
    for name in ("qwen.tiktoken", "tokenizer_config.json", "tokenization_qwen.py", "chat_format.py"):
        shutil.copyfile(checkpoint / name, official / name)

    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result_file = tmp_path / "result.pt"
    site_packages = sysconfig.get_paths()["purelib"]
    command = [
        sys.executable,
        "-S",
        "-c",
        REMOTE_CODE_SCRIPT,
        str(checkpoint),
        str(result_file),
        site_packages,
        TEXT,
        str(official),
    ]
    completed = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    remote = torch.load(result_file)

    assert not remote["qwen_model_loaded"]
    assert all(module.startswith("transformers_modules.") for module in remote["modules"]), remote["modules"]
    assert remote["ids"] == tokenizer.encode(TEXT)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            local_logits = model(torch.tensor([remote["ids"]])).logits
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(remote["logits"], local_logits)
    assert remote["response"] == chat(model, tokenizer, "Hi there", do_sample=False, max_new_tokens=6)[0]
    assert remote["template"] == remote["official_template"] == CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    local = tokenizer.apply_chat_template(messages, return_dict=True, return_assistant_tokens_mask=True)
    assert remote["templated"] == dict(local) and 1 in local["assistant_masks"]
    assert remote["official_prompt"] == make_context(tokenizer, "Hi there")[1]

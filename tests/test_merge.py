"""merge_lora.py: a LoRA adapter (with trained wte/lm_head) folded into its base reproduces base+adapter."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qwen_finetune.errors import ArgumentError, OutputDirError
from qwen_finetune.merge import (
    AdapterError,
    MergeArguments,
    QuantizedBaseError,
    build_parser,
    main,
    merge_adapter,
)

LORA_TARGETS = ["c_attn", "c_proj", "w1", "w2"]
PORTABLE_FILES = [
    "configuration_qwen.py",
    "modeling_qwen.py",
    "tokenization_qwen.py",
    "qwen_generation_utils.py",
]


def make_adapter(base_dir: Path, out_dir: Path, modules_to_save: list[str] | None, seed: int = 0) -> Path:
    """A LoRA adapter whose update is not zero (random B), with perturbed trainable embeddings."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    import qwen_model  # noqa: F401

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=LORA_TARGETS,
        modules_to_save=modules_to_save,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(0.05 * torch.randn_like(parameter))
    peft_model.save_pretrained(out_dir)
    return out_dir


def chat_ids(tokenizer) -> torch.Tensor:
    from qwen_model.qwen_generation_utils import make_context

    return torch.tensor(
        [make_context(tokenizer, "Name three colours of the rainbow.", [("Hi", "Hello!")])[1]]
    )


@torch.no_grad()
def base_plus_adapter_logits(base_dir: Path, adapter_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter_dir).eval()(input_ids=ids).logits


def merge(adapter: Path, out: Path, **options) -> dict:
    return merge_adapter(MergeArguments(adapter_dir=str(adapter), output_dir=str(out), **options))


@pytest.fixture(scope="module")
def adapter_dir(tiny_chat_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_adapter(tiny_chat_checkpoint, tmp_path_factory.mktemp("adapter"), ["wte", "lm_head"])


@pytest.fixture(scope="module")
def merged(adapter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("merged-parent") / "merged"
    report = merge(adapter_dir, out, max_shard_size="20MB")
    return out, report


def test_merged_model_reproduces_base_plus_adapter(
    merged, adapter_dir: Path, tiny_chat_checkpoint: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, report = merged
    assert report["max_abs_logit_diff"] <= report["tolerance"] <= 1e-3
    ids = chat_ids(AutoTokenizer.from_pretrained(out))
    expected = base_plus_adapter_logits(tiny_chat_checkpoint, adapter_dir, ids)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        actual = reloaded(input_ids=ids).logits
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_checkpoint).eval()
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
    assert (expected - base_logits).abs().max() > 1e-2  # the adapter does change the model
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_trained_embeddings_are_taken_from_the_adapter(merged, adapter_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    out, _ = merged
    adapter_weights = load_file(adapter_dir / "adapter_model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(
        model.transformer.wte.weight, adapter_weights["base_model.model.transformer.wte.weight"]
    )
    assert torch.equal(model.lm_head.weight, adapter_weights["base_model.model.lm_head.weight"])


def test_merged_directory_has_the_official_layout(merged, tiny_chat_checkpoint: Path) -> None:
    out, report = merged
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen.QWenLMHeadModel"
    assert config["auto_map"]["AutoConfig"] == "configuration_qwen.QWenConfig"
    assert "quantization_config" not in config
    assert config["fp32"] is True and report["saved_dtype"] == "float32"  # the tiny base is stored fp32
    for name in ["qwen.tiktoken", "generation_config.json"]:
        assert (out / name).read_bytes() == (tiny_chat_checkpoint / name).read_bytes()
    assert json.loads((out / "tokenizer_config.json").read_text())["auto_map"]
    for name in PORTABLE_FILES:
        assert (out / name).is_file()
    shards = sorted(path.name for path in out.glob("*.safetensors"))
    assert len(shards) > 1 and shards == report["weight_files"]
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert [path.name for path in out.parent.iterdir()] == ["merged"]  # no staging leftovers


def test_merge_in_bfloat16_writes_a_bfloat16_checkpoint(adapter_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    report = merge(adapter_dir, tmp_path / "bf16", dtype="bfloat16")
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert (config["bf16"], config["fp32"], config["dtype"]) == (True, False, "bfloat16")
    assert report["max_abs_logit_diff"] <= report["tolerance"]
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16


def test_qlora_adapter_merges_into_the_full_precision_base_only(
    tiny_chat_checkpoint: Path, tmp_path: Path
) -> None:
    """An adapter trained on a GPTQ model: refused alone (naming the recorded source), merged with it."""
    quantized = tmp_path / "int4"
    shutil.copytree(tiny_chat_checkpoint, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    (quantized / "config.json").write_text(json.dumps(config))
    (quantized / "quantize_report.json").write_text(json.dumps({"source_model": str(tiny_chat_checkpoint)}))
    adapter = make_adapter(tiny_chat_checkpoint, tmp_path / "qlora", None)
    adapter_config = json.loads((adapter / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = str(quantized)
    (adapter / "adapter_config.json").write_text(json.dumps(adapter_config))

    with pytest.raises(QuantizedBaseError, match=f"--base_model_path {tiny_chat_checkpoint}"):
        merge(adapter, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    with pytest.raises(QuantizedBaseError, match="GPTQ-quantized"):
        merge(adapter, tmp_path / "refused", base_model_path=str(quantized))

    report = merge(adapter, tmp_path / "merged", base_model_path=str(tiny_chat_checkpoint))
    assert report["base_model_path"] == str(tiny_chat_checkpoint.resolve())
    assert any("Q-LoRA adapter" in note and str(quantized) in note for note in report["notes"])
    assert report["max_abs_logit_diff"] <= report["tolerance"]


# ------------------------------------------------------------------------------------------ bad input


def test_full_model_directory_is_not_an_adapter(tiny_chat_checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="nothing to merge"):
        merge(tiny_chat_checkpoint, tmp_path / "out")


def test_missing_adapter_directory(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="does not exist"):
        merge(tmp_path / "nope", tmp_path / "out")


def test_adapter_without_weights(adapter_dir: Path, tmp_path: Path) -> None:
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    shutil.copy(adapter_dir / "adapter_config.json", incomplete)
    with pytest.raises(AdapterError, match="no adapter weights"):
        merge(incomplete, tmp_path / "out")


def test_adapter_that_does_not_fit_the_base(adapter_dir: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(adapter_dir, broken)
    weights = load_file(broken / "adapter_model.safetensors")
    key = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
    weights[key] = torch.zeros(4, 96)
    weights["base_model.model.transformer.h.7.mlp.w1.lora_A.weight"] = torch.zeros(4, 64)
    save_file(weights, broken / "adapter_model.safetensors")
    with pytest.raises(AdapterError) as error:
        merge(broken, tmp_path / "out")
    message = str(error.value)
    assert (
        f"{key}: shape [4, 96] does not fit transformer.h.0.attn.c_attn.weight of shape [192, 64]" in message
    )
    assert "the base model has no module transformer.h.7.mlp.w1" in message
    assert "--base_model_path" in message
    assert not (tmp_path / "out").exists()


def test_non_empty_output_is_kept_unless_overwrite(adapter_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="--overwrite"):
        merge(adapter_dir, out)
    assert [path.name for path in out.iterdir()] == ["keep.txt"]
    merge(adapter_dir, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"]


DISK_FULL = "No space left on device"


@pytest.mark.parametrize(
    ("failure", "reported_as"),
    [
        (OSError(28, DISK_FULL, "tokenizer_config.json"), OutputDirError),
        (SafetensorError(f"Error while serializing: I/O error: {DISK_FULL} (os error 28)"), OutputDirError),
        (SafetensorError("Error while serializing: tensors share memory"), SafetensorError),
    ],
    ids=["os-error", "safetensors-io-error", "safetensors-bug"],
)
def test_failure_while_writing_leaves_nothing_half_written(
    failure: Exception,
    reported_as: type[Exception],
    adapter_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The old output survives a failed --overwrite run and no staging directory is left behind; a full
    disk is a one-line error naming the output, anything else keeps its type."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def fail(directory: Path, **_: object) -> None:
        assert (directory / "config.json").is_file()  # the weights are being written: fail half-way
        raise failure

    monkeypatch.setattr("qwen_finetune.model_dir.complete_model_dir", fail)
    with pytest.raises(reported_as) as raised:
        merge(adapter_dir, out, overwrite=True)
    if reported_as is OutputDirError:
        assert str(raised.value).startswith(f"writing the merged model for {out} failed: ")
        assert DISK_FULL in str(raised.value)
    assert [path.name for path in tmp_path.iterdir()] == ["out"]
    assert [path.name for path in out.iterdir()] == ["keep.txt"]


def test_output_that_would_replace_the_base_is_refused(adapter_dir: Path, tiny_chat_checkpoint: Path) -> None:
    with pytest.raises(OutputDirError, match="would replace the input"):
        merge(adapter_dir, tiny_chat_checkpoint.parent, overwrite=True)


@pytest.mark.parametrize("where", ["under-a-file", "proc"])
def test_unwritable_output_is_refused_before_any_work(adapter_dir: Path, tmp_path: Path, where: str) -> None:
    if where == "under-a-file":
        (tmp_path / "file.txt").write_text("")
        out = tmp_path / "file.txt" / "merged"
    else:
        if not Path("/proc/self").exists():
            pytest.skip("no /proc on this system")
        out = Path("/proc/qwen-merge-test")
    with pytest.raises(OutputDirError, match="cannot"):
        merge(adapter_dir, out)


def test_command_reports_errors_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--adapter_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "out")])
    assert code == 1
    assert ": error: " in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_unreadable_adapter_weights_are_named(
    adapter_dir: Path, tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    shutil.copy(adapter_dir / "adapter_config.json", damaged)
    (damaged / f"adapter_model{suffix}").write_bytes(b"not a tensor file" * 4)
    args = ["--adapter_dir", str(damaged), "--output_dir", str(tmp_path / "out")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"error: cannot read the adapter weights {damaged / f'adapter_model{suffix}'}" in err
    assert "Traceback" not in err


def test_base_that_is_not_a_qwen_model_is_refused(adapter_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ArgumentError, match="model_type 'llama'"):
        merge(adapter_dir, tmp_path / "out", base_model_path=str(other))


# ------------------------------------------------------------------------------------ command line


def parsed(argv: list[str]) -> MergeArguments:
    return MergeArguments(**vars(build_parser().parse_args(argv)))


@pytest.mark.parametrize(
    "argv",
    [
        ["--adapter_dir", "ADAPTER", "--output_dir", "OUT"],
        ["--adapter_path", "ADAPTER", "--new_model_directory", "OUT"],
        ["--path_to_adapter", "ADAPTER", "--output-dir", "OUT"],
    ],
    ids=["current", "original", "mixed"],
)
def test_every_spelling_of_a_flag_sets_the_same_option(argv: list[str]) -> None:
    options = parsed(argv)
    assert options == MergeArguments(adapter_dir="ADAPTER", output_dir="OUT")
    assert (options.base_model_path, options.max_shard_size, options.dtype, options.overwrite) == (
        None,
        "2GB",
        "auto",
        False,
    )
    assert parsed([*argv, "--dtype", "bfloat16", "--overwrite"]).compute_dtype == "bfloat16"


def test_flag_errors(capsys: pytest.CaptureFixture[str]) -> None:
    required = ["--adapter_dir", "A", "--output_dir", "O"]
    with pytest.raises(SystemExit) as stopped:
        main([*required, "--dtype", "float64"])
    assert stopped.value.code == 2 and "invalid choice: 'float64'" in capsys.readouterr().err
    assert main([*required, "--max_shard_size", "big"]) == 1
    assert "error: --max_shard_size 'big' is not a size; write it like 2GB" in capsys.readouterr().err


def test_internal_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only the toolkit's own errors become one-line messages; anything else is a bug and propagates."""

    def broken(adapter_dir: str) -> None:
        raise ValueError("an internal bug")

    monkeypatch.setattr("qwen_finetune.merge.resolve_adapter", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["--adapter_dir", str(tmp_path), "--output_dir", str(tmp_path / "out")])


def test_help_loads_neither_torch_nor_peft(repo_root: Path) -> None:
    probe = (
        "import sys\n"
        "from qwen_finetune.merge import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(set(sys.modules) & {'torch', 'peft', 'safetensors', 'qwen_model', 'gptqmodel'}))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe], cwd=repo_root, capture_output=True, text=True, check=True, timeout=300
    )
    assert "--new_model_directory" in completed.stdout and "--path_to_adapter" in completed.stdout
    assert completed.stdout.splitlines()[-1] == "[]"

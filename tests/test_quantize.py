"""run_gptq.py: GPTQ int4/int8 checkpoints in the released Qwen format that load as they are.

The tiny model's layer inputs are 64 (hidden) and 128 (MLP) wide, so the tests use group size 32;
the CPU int4 kernel needs every input width to be a multiple of the group size (checked up front).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from qwen_finetune.data import DataError
from qwen_finetune.errors import ArgumentError, OutputDirError
from qwen_finetune.quantize import (
    MissingDependencyError,
    QuantizeArguments,
    QuantizeError,
    Sample,
    build_parser,
    format_loss_table,
    load_conversations,
    main,
    quantize_checkpoint,
    split_samples,
)

QUANTIZED_LAYERS = ["attn.c_attn", "attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj"]
MAX_LEN = 256


def official_config(bits: int) -> dict:
    return {
        "bits": bits,
        "group_size": 32,
        "damp_percent": 0.01,
        "desc_act": False,
        "static_groups": False,
        "sym": True,
        "true_sequential": True,
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
    }


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gptq")


@pytest.fixture(scope="module")
def calibration_file(shared_data_dir: Path, workdir: Path) -> Path:
    samples = json.loads((shared_data_dir / "llamafactory_alpaca_en_demo.json").read_text())[:48]
    path = workdir / "calibration.json"
    path.write_text(json.dumps(samples, ensure_ascii=False))
    return path


def quantize(source: Path, out: Path, data: Path, bits: int, **overrides) -> dict:
    options = {
        "group_size": 32,
        "num_samples": 12,
        "num_eval_samples": 4,
        "max_len": MAX_LEN,
        "data_cache_dir": str(out.parent / "data-cache"),
    }
    arguments = QuantizeArguments(
        model_name_or_path=str(source),
        data_path=str(data),
        output_dir=str(out),
        bits=bits,
        **{**options, **overrides},
    )
    return quantize_checkpoint(arguments)


def parsed(argv: list[str]) -> QuantizeArguments:
    return QuantizeArguments(**vars(build_parser().parse_args(argv)))


@dataclass
class CommandRun:
    out: Path
    report: dict
    stdout: str
    stderr: str
    cwd: Path


@pytest.fixture(scope="module")
def int4(tiny_chat_checkpoint: Path, calibration_file: Path, workdir: Path, repo_root: Path) -> CommandRun:
    """`run_gptq.py` as a user runs it, with the original flag names, from an empty working directory."""
    out, cwd = workdir / "int4", workdir / "cwd"
    cwd.mkdir()
    argv = [
        "--model_name_or_path", str(tiny_chat_checkpoint), "--data_path", str(calibration_file),
        "--out_path", str(out), "--bits", "4", "--group-size", "32", "--max_len", str(MAX_LEN),
        "--num_samples", "12", "--num_eval_samples", "4", "--data_cache_dir", str(workdir / "data-cache"),
    ]  # fmt: skip
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in ("QWEN_FINETUNE_VERBOSE", "PYTEST_CURRENT_TEST")
    }
    completed = subprocess.run(
        [sys.executable, str(repo_root / "run_gptq.py"), *argv],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads((out / "quantize_report.json").read_text())
    return CommandRun(out, report, completed.stdout, completed.stderr, cwd)


@pytest.mark.slow
def test_checkpoint_has_the_released_int4_format(int4, tiny_chat_checkpoint: Path) -> None:
    out, report = int4.out, int4.report
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == official_config(4)
    assert json.loads((out / "quantize_config.json").read_text()) == official_config(4)
    assert (config["dtype"], config["fp16"], config["fp32"]) == ("float16", True, False)
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen.QWenLMHeadModel"
    assert config["use_cache"] is True
    for name in ["qwen.tiktoken", "generation_config.json"]:
        assert (out / name).read_bytes() == (tiny_chat_checkpoint / name).read_bytes()
    for name in ["modeling_qwen.py", "tokenization_qwen.py", "tokenizer_config.json"]:
        assert (out / name).is_file()
    assert report["source_model"] == str(tiny_chat_checkpoint.resolve())
    assert report["weight_files"] == sorted(path.name for path in out.glob("*.safetensors"))
    assert not any(path.name.startswith(".int") for path in out.parent.iterdir())  # no staging leftovers


@pytest.mark.slow
def test_quantized_model_loads_as_it_is(int4, tiny_chat_checkpoint: Path) -> None:
    """Plain from_pretrained gives the GPTQ kernels in every quantized layer, close to the original."""
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([list(range(1000, 1040))])
    original = AutoModelForCausalLM.from_pretrained(tiny_chat_checkpoint, dtype=torch.float16).eval()
    model = AutoModelForCausalLM.from_pretrained(int4.out).eval()
    assert model.dtype == torch.float16
    for block in model.transformer.h:
        for layer in QUANTIZED_LAYERS:
            module = block.get_submodule(layer)
            assert hasattr(module, "qweight") and module.bits == 4, (layer, type(module))
    assert not hasattr(model.lm_head, "qweight") and not hasattr(model.transformer.wte, "qweight")
    with torch.no_grad():
        error = (model(input_ids=ids).logits.float() - original(input_ids=ids).logits.float()).abs().max()
    assert 0 < float(error) < 0.5


@pytest.mark.slow
def test_report_is_the_loss_on_held_out_samples(
    int4, calibration_file: Path, tiny_chat_checkpoint: Path
) -> None:
    """The reported losses are what the two models score on samples the calibration never saw."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, report = int4.out, int4.report
    evaluation = report["eval"]
    assert evaluation["held_out"] and evaluation["samples"] == 4
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_checkpoint)
    samples = load_conversations(
        [str(calibration_file)], tokenizer, MAX_LEN, "auto", "You are a helpful assistant.", str(out.parent)
    )
    calibration, held_out = split_samples(samples, 12, 4, seed=0, has_eval_files=False)
    assert not {tuple(s.input_ids) for s in calibration} & {tuple(s.input_ids) for s in held_out}
    assert report["calibration"]["tokens"] == sum(len(sample.input_ids) for sample in calibration)

    model = AutoModelForCausalLM.from_pretrained(out).eval()
    total, tokens = 0.0, 0
    for sample in held_out:
        supervised = sum(label != -100 for label in sample.labels[1:])
        with torch.no_grad():
            loss = model(
                input_ids=torch.tensor([sample.input_ids]), labels=torch.tensor([sample.labels])
            ).loss
        total, tokens = total + float(loss) * supervised, tokens + supervised
    assert evaluation["supervised_tokens"] == tokens
    assert evaluation["quantized"]["mean_loss"] == pytest.approx(total / tokens, abs=1e-4)
    assert evaluation["quantized"]["perplexity"] == pytest.approx(math.exp(total / tokens), rel=1e-4)
    assert abs(evaluation["quantized"]["mean_loss"] - evaluation["original"]["mean_loss"]) < 0.05


@pytest.mark.slow
def test_command_prints_the_data_report_and_the_loss_table_only(int4: CommandRun) -> None:
    """gptqmodel's banner, log lines, progress output and the configs it dumps while saving stay
    hidden, and its per-layer log does not land in ./logs of the working directory."""
    report, stdout = int4.report, int4.stdout
    summary = (
        f"{format_loss_table(report)}\n"
        f"wrote {report['output_dir']}: GPTQ int4, group size 32, 1 weight file(s) ({report['quantize_seconds']} s)\n"
    )
    assert stdout.startswith("Data report") and stdout.endswith(summary), stdout
    data_report = stdout.removesuffix(summary).splitlines()
    assert all(not line or line.startswith(("Data report", "  ")) for line in data_report), stdout
    assert "[gptq] calibration: 12 samples" in int4.stderr
    assert list(int4.cwd.iterdir()) == []


@pytest.mark.slow
def test_command_refuses_an_already_quantized_checkpoint(
    int4: CommandRun, calibration_file: Path, workdir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "--model_name_or_path",
        str(int4.out),
        "--data_path",
        str(calibration_file),
        "--out_path",
        str(workdir / "x"),
    ]
    assert main(args) == 1
    assert "already quantized (gptq, 4-bit)" in capsys.readouterr().err


def test_split_sets_held_out_samples_aside_before_calibration() -> None:
    samples = [Sample(list(range(length)), [-100] + list(range(1, length))) for length in range(5, 45)]
    calibration, held_out = split_samples(
        samples, num_samples=10, num_eval_samples=8, seed=0, has_eval_files=False
    )
    usable = [sample for sample in samples if len(sample.input_ids) > 10]  # gptqmodel drops shorter ones
    assert (len(calibration), len(held_out)) == (10, 8)
    lengths = [len(sample.input_ids) for sample in calibration + held_out]
    assert len(set(lengths)) == 18 and min(lengths) > 10  # disjoint, all usable
    assert split_samples(samples, 10, 8, seed=0, has_eval_files=False) == (calibration, held_out)
    assert split_samples(samples, 10, 8, seed=1, has_eval_files=False) != (calibration, held_out)
    few = usable[:5]
    assert [len(part) for part in split_samples(few, 10, 8, seed=0, has_eval_files=False)] == [3, 2]
    assert [len(part) for part in split_samples(usable, 100, 8, seed=0, has_eval_files=True)] == [
        len(usable),
        0,
    ]


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"bits": 5}, "--bits 5 is not supported: choose one of 2, 3, 4, 8"),
        (
            {"group_size": 128},
            r"--group_size 128 does not divide the input width of attn.c_attn.*hidden_size\) = 64",
        ),
        ({"group_size": 48}, "--group_size 48 is not supported"),
        ({"damp_percent": 1.5}, "--damp_percent 1.5 must be between 0 and 1"),
        ({"dtype": "float32"}, "--dtype float32 is not supported"),
    ],
)
def test_bad_settings_are_refused_before_loading(
    overrides: dict, message: str, tiny_chat_checkpoint: Path, calibration_file: Path, tmp_path: Path
) -> None:
    options = {"bits": 4, **overrides}
    with pytest.raises(ArgumentError, match=message):
        quantize(tiny_chat_checkpoint, tmp_path / "out", calibration_file, **options)
    assert not (tmp_path / "out").exists()


def test_adapter_directory_is_refused(tmp_path: Path, calibration_file: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(QuantizeError, match="merge it into its base first"):
        quantize(adapter, tmp_path / "out", calibration_file, bits=4)


@pytest.mark.parametrize(
    ("content", "error", "message"),
    [
        ("[]", DataError, "contains no samples"),
        (
            json.dumps(
                [{"conversations": [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Yo"}]}]
            ),
            QuantizeError,
            r"calibration data is too short: \d+ tokens in 1 usable samples .* widest quantized layer has 128 inputs",
        ),
    ],
    ids=["empty", "too-short"],
)
def test_unusable_calibration_data_is_refused(
    content: str, error: type[Exception], message: str, tiny_chat_checkpoint: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data.json"
    data.write_text(content)
    with pytest.raises(error, match=message):
        quantize(tiny_chat_checkpoint, tmp_path / "out", data, bits=4)
    assert not (tmp_path / "out").exists()


def test_missing_gptqmodel_names_the_extra_to_install(
    monkeypatch: pytest.MonkeyPatch, tiny_chat_checkpoint: Path, calibration_file: Path, tmp_path: Path
) -> None:
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gptqmodel" else real_find_spec(name, *a),
    )
    with pytest.raises(MissingDependencyError, match=r"needs gptqmodel.*pip install 'qwen-finetune\[gptq\]'"):
        quantize(tiny_chat_checkpoint, tmp_path / "out", calibration_file, bits=4)


def test_non_empty_output_directory_is_kept(
    tiny_chat_checkpoint: Path, calibration_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputDirError, match="not empty; pass --overwrite"):
        quantize(tiny_chat_checkpoint, out, calibration_file, bits=4)
    assert [path.name for path in out.iterdir()] == ["keep.txt"]


def test_quantized_source_is_refused(
    tiny_chat_checkpoint: Path, calibration_file: Path, tmp_path: Path
) -> None:
    fake = tmp_path / "fake-int8"
    shutil.copytree(tiny_chat_checkpoint, fake)
    config = json.loads((fake / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 8}
    (fake / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizeError, match="already quantized .*quantize the full-precision model"):
        quantize(fake, tmp_path / "out", calibration_file, bits=4)


# ------------------------------------------------------------------------------------ command line

ORIGINAL_COMMAND = [
    "--model_name_or_path",
    "MODEL",
    "--data_path",
    "a.json,b.jsonl",
    "--out_path",
    "OUT",
    "--bits",
    "4",
]


def test_original_command_line_gives_the_released_defaults() -> None:
    options = parsed(ORIGINAL_COMMAND)
    assert options == QuantizeArguments(
        model_name_or_path="MODEL", data_path="a.json,b.jsonl", output_dir="OUT"
    )
    assert (options.bits, options.group_size, options.max_len, options.damp_percent) == (4, 128, 8192, 0.01)
    assert (options.desc_act, options.dtype, options.data_format) == (False, "float16", "auto")
    assert options.data_files == ["a.json", "b.jsonl"] and options.eval_files == []


@pytest.mark.parametrize(
    "names",
    [["--out_path", "--group-size"], ["--output_dir", "--group_size"], ["--output-dir", "--group-size"]],
    ids=["original", "current", "dashes"],
)
def test_every_spelling_of_a_flag_sets_the_same_option(names: list[str]) -> None:
    output_flag, group_flag = names
    argv = [
        "--model_name_or_path",
        "M",
        "--data_path",
        "d.json",
        output_flag,
        "OUT",
        group_flag,
        "64",
        "--desc_act",
    ]
    options = parsed([*argv, "--bits", "8"])
    assert (options.output_dir, options.group_size, options.desc_act, options.bits) == ("OUT", 64, True, 8)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--bits", "5"], "argument --bits: invalid choice: '5'"),
        (["--group-size", "48"], "invalid choice: '48'"),
        (["--dtype", "float32"], "invalid choice: 'float32'"),
        (["--data_format", "csv"], "invalid choice: 'csv'"),
        (["--overwite"], "unrecognized arguments: --overwite"),
    ],
)
def test_flag_errors_stop_with_the_usage(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main([*ORIGINAL_COMMAND, *flags])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--damp_percent", "1.5"], "--damp_percent 1.5 must be between 0 and 1"),
        (["--max_len", "8"], "--max_len 8 must be larger than 10 tokens"),
        (["--max_shard_size", "lots"], "--max_shard_size 'lots' is not a size"),
    ],
)
def test_bad_values_are_one_line_errors(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*ORIGINAL_COMMAND, *flags]) == 1
    err = capsys.readouterr().err
    assert f": error: {message}" in err and "Traceback" not in err


def test_internal_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only the toolkit's own errors become one-line messages; anything else is a bug and propagates."""

    def broken(model_dir: str | Path) -> Path:
        raise ValueError("an internal bug")

    monkeypatch.setattr("qwen_finetune.quantize.check_source_model", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(
            [
                "--model_name_or_path",
                str(tmp_path),
                "--data_path",
                "d.json",
                "--output_dir",
                str(tmp_path / "o"),
            ]
        )


def test_help_loads_no_quantization_backend(repo_root: Path) -> None:
    probe = (
        "import sys\n"
        "from qwen_finetune.quantize import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(set(sys.modules) & {'gptqmodel', 'optimum', 'peft', 'bitsandbytes', 'logbar'}))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe], cwd=repo_root, capture_output=True, text=True, check=True, timeout=300
    )
    assert "--out_path" in completed.stdout and "--group-size" in completed.stdout
    assert completed.stdout.splitlines()[-1] == "[]"

"""The whole after-training chain on a tiny model, with the repository's own commands:

finetune.py --use_lora -> merge_lora.py (logits check) -> run_gptq.py int4 and int8 (load, forward,
loss report) -> finetune.py --use_lora --q_lora on the int4 output -> cli_demo.py --query on each
artifact, each answer equal to what model.chat() gives for that artifact. The commands run through
their main() in this process (cli_demo.py also as a script, to check its stdout).
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwen_finetune.chat_cli import main as chat_main
from qwen_finetune.merge import MergeArguments, QuantizedBaseError, merge_adapter
from qwen_finetune.merge import main as merge_main
from qwen_finetune.quantize import Sample, load_conversations
from qwen_finetune.quantize import main as gptq_main
from qwen_finetune.train import main as train_main

pytestmark = pytest.mark.slow

MAX_LEN = 128
QUERY = "Who are you?"
MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("chain")


@pytest.fixture(scope="module")
def data_file(repo_root: Path) -> Path:
    return repo_root / "data" / "example.json"


def run_command(main, argv: list[str]) -> str:
    """Run a command's main() in this process; returns its stdout, fails with it on a non-zero exit."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(argv)
    assert code == 0, f"exit {code}\n{stderr.getvalue()[-3000:]}"
    return stdout.getvalue()


def finetune(model: Path, data: Path, output: Path, extra: list[str]) -> Path:
    """finetune.py's main() with a few deterministic fp32 LoRA steps."""
    argv = [
        "--model_name_or_path", str(model),
        "--data_path", str(data),
        "--output_dir", str(output),
        "--data_cache_dir", str(output.parent / "data-cache"),
        "--model_max_length", str(MAX_LEN),
        "--per_device_train_batch_size", "2",
        "--max_steps", "6",
        "--learning_rate", "1e-2",
        "--lr_scheduler_type", "constant",
        "--warmup_ratio", "0",
        "--weight_decay", "0",
        "--logging_steps", "1",
        "--save_strategy", "no",
        "--report_to", "none",
        "--use_lora",
        *extra,
    ]  # fmt: skip
    run_command(train_main, argv)
    return output


def encoded_samples(model_dir: Path, data: Path, workdir: Path) -> list[Sample]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    samples = load_conversations(
        [str(data)], tokenizer, MAX_LEN, "auto", "You are a helpful assistant.", str(workdir)
    )
    return samples[:8]


@torch.no_grad()
def mean_loss(model: torch.nn.Module, samples: list[Sample]) -> float:
    model.eval()
    total, tokens = 0.0, 0
    for sample in samples:
        supervised = sum(label != -100 for label in sample.labels[1:])
        loss = model(input_ids=torch.tensor([sample.input_ids]), labels=torch.tensor([sample.labels])).loss
        total, tokens = total + float(loss) * supervised, tokens + supervised
    return total / tokens


def load(model_dir: Path, adapter: Path | None = None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


@pytest.fixture(scope="module")
def samples(tiny_chat_checkpoint: Path, data_file: Path, workdir: Path) -> list[Sample]:
    return encoded_samples(tiny_chat_checkpoint, data_file, workdir)


@pytest.fixture(scope="module")
def lora(tiny_chat_checkpoint: Path, data_file: Path, workdir: Path) -> Path:
    return finetune(tiny_chat_checkpoint, data_file, workdir / "lora", [])


@pytest.fixture(scope="module")
def merged(lora: Path, workdir: Path) -> tuple[Path, str]:
    out = workdir / "merged"
    printed = run_command(
        merge_main, ["--adapter_dir", str(lora), "--output_dir", str(out), "--max_shard_size", "30MB"]
    )
    return out, printed


@pytest.fixture(scope="module")
def gptq(merged: tuple[Path, str], data_file: Path, workdir: Path) -> dict[int, tuple[Path, str]]:
    eval_file = workdir / "eval.json"
    eval_file.write_text(json.dumps(json.loads(data_file.read_text())[-6:], ensure_ascii=False))
    results = {}
    for bits in (4, 8):
        out = workdir / f"int{bits}"
        held_out = ["--eval_data_path", str(eval_file)] if bits == 8 else []
        argv = [
            "--model_name_or_path", str(merged[0]),
            "--data_path", str(data_file),
            "--out_path", str(out),
            "--bits", str(bits),
            "--group-size", "32",
            "--max_len", str(MAX_LEN),
            "--num_samples", "16",
            "--num_eval_samples", "4",
            "--data_cache_dir", str(workdir / "data-cache"),
            *held_out,
        ]  # fmt: skip
        results[bits] = (out, run_command(gptq_main, argv))
    return results


@pytest.fixture(scope="module")
def qlora(gptq: dict[int, tuple[Path, str]], data_file: Path, workdir: Path) -> Path:
    return finetune(gptq[4][0], data_file, workdir / "qlora", ["--q_lora"])


def test_lora_training_lowered_the_loss(
    lora: Path, tiny_chat_checkpoint: Path, samples: list[Sample]
) -> None:
    assert (
        mean_loss(load(tiny_chat_checkpoint, lora), samples)
        < mean_loss(load(tiny_chat_checkpoint), samples) - 0.1
    )


def test_merged_model_is_base_plus_adapter(
    merged: tuple[Path, str], lora: Path, tiny_chat_checkpoint: Path, samples: list[Sample]
) -> None:
    out, printed = merged
    assert "self-check on 3 prompts: max logit difference" in printed
    ids = torch.tensor([samples[0].input_ids])
    with torch.no_grad():
        expected = load(tiny_chat_checkpoint, lora)(input_ids=ids).logits
        actual = load(out)(input_ids=ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def test_gptq_outputs_load_and_report_their_loss(
    gptq: dict[int, tuple[Path, str]], merged: tuple[Path, str], samples: list[Sample]
) -> None:
    merged_model = load(merged[0]).to(torch.float16)
    merged_loss = mean_loss(merged_model, samples)
    ids = torch.tensor([samples[0].input_ids])
    with torch.no_grad():
        reference = merged_model(input_ids=ids).logits.float()
    logit_error = {}
    for bits, (out, printed) in gptq.items():
        assert f"int{bits} (gptq)" in printed and "original" in printed and "perplexity" in printed
        report = json.loads((out / "quantize_report.json").read_text())
        assert report["source_model"] == str(merged[0])
        model = load(out)
        assert model.transformer.h[0].mlp.w1.bits == bits
        assert abs(mean_loss(model, samples) - merged_loss) < 0.2
        with torch.no_grad():
            logit_error[bits] = float((model(input_ids=ids).logits.float() - reference).abs().max())
        original, quantized = (
            report["eval"]["original"]["mean_loss"],
            report["eval"]["quantized"]["mean_loss"],
        )
        assert abs(quantized - original) < 0.2
    assert 0 < logit_error[8] < logit_error[4], logit_error  # 8 bits stay closer to the original than 4


def test_qlora_on_int4_trains_and_merges_into_the_full_precision_model(
    qlora: Path,
    gptq: dict[int, tuple[Path, str]],
    merged: tuple[Path, str],
    samples: list[Sample],
    workdir: Path,
) -> None:
    int4 = gptq[4][0]
    assert json.loads((qlora / "adapter_config.json").read_text())["base_model_name_or_path"] == str(int4)
    assert mean_loss(load(int4, qlora), samples) < mean_loss(load(int4), samples) - 0.05
    with pytest.raises(QuantizedBaseError, match=f"--base_model_path {merged[0]}"):
        merge_adapter(MergeArguments(adapter_dir=str(qlora), output_dir=str(workdir / "qlora-merged")))
    report = merge_adapter(
        MergeArguments(
            adapter_dir=str(qlora), output_dir=str(workdir / "qlora-merged"), base_model_path=str(merged[0])
        )
    )
    assert any(note.startswith("Q-LoRA adapter") for note in report["notes"])


@pytest.mark.parametrize("artifact", ["merged", "int4", "int8", "base+lora", "int4+qlora"])
def test_chat_query_on_every_artifact(
    artifact: str, merged, gptq, lora: Path, qlora: Path, tiny_chat_checkpoint: Path
) -> None:
    from transformers import AutoTokenizer, GenerationConfig, set_seed

    model_dir, adapter = {
        "merged": (merged[0], None),
        "int4": (gptq[4][0], None),
        "int8": (gptq[8][0], None),
        "base+lora": (tiny_chat_checkpoint, lora),
        "int4+qlora": (gptq[4][0], qlora),
    }[artifact]
    argv = ["-c", str(model_dir), "--query", QUERY, "--seed", "11", "--max_new_tokens", str(MAX_NEW_TOKENS)]
    printed = run_command(chat_main, [*argv, *(["--adapter", str(adapter)] if adapter else [])])

    settings = adapter or model_dir
    config = GenerationConfig.from_pretrained(settings)
    config.max_new_tokens = MAX_NEW_TOKENS
    model = load(model_dir, adapter)  # before seeding: building LoRA layers draws random numbers
    set_seed(11)
    expected, _ = model.chat(
        AutoTokenizer.from_pretrained(settings), QUERY, history=None, generation_config=config
    )
    assert printed == expected + "\n"


def test_cli_demo_on_a_gptq_model_prints_only_the_reply(gptq, repo_root: Path) -> None:
    """gptqmodel logs to stdout; the command keeps its lines out of the output, so scripts can use the
    answer and a user sees only it."""
    command = [sys.executable, "cli_demo.py", "-c", str(gptq[4][0]), "--query", QUERY]
    result = subprocess.run(
        [*command, "--max_new_tokens", str(MAX_NEW_TOKENS)],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("\n") == 1
    assert "GPT-QModel" not in result.stdout + result.stderr

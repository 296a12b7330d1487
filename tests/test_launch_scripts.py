"""The finetune/*.sh launch scripts: options, environment, device detection and the command they run.

A fake interpreter stands in for $PYTHON: it answers the GPU-count probe and records the command
line it was given, so these tests check what would run without training anything (the training
tests run the scripts for real)."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = REPO_ROOT / "finetune"
TORCHRUN_SCRIPTS = ["finetune_ds.sh", "finetune_lora_ds.sh", "finetune_qlora_ds.sh"]
SINGLE_SCRIPTS = ["finetune_lora_single_gpu.sh", "finetune_qlora_single_gpu.sh"]
ALL_SCRIPTS = TORCHRUN_SCRIPTS + SINGLE_SCRIPTS
DEFAULT_CONFIG = {
    "finetune_ds.sh": "ds_config_zero3.json",
    "finetune_lora_ds.sh": "ds_config_zero2.json",
    "finetune_qlora_ds.sh": "ds_config_zero2.json",
    "finetune_lora_single_gpu.sh": None,
    "finetune_qlora_single_gpu.sh": "ds_config_zero2.json",
}

FAKE_PYTHON = """#!/usr/bin/env bash
if [[ "$1" == "-c" ]]; then echo "${FAKE_GPUS:-0}"; exit 0; fi
printf '%s\\n' "$@" > "$FAKE_ARGV_FILE"
"""


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    path = tmp_path / "bin" / "python"
    path.parent.mkdir()
    path.write_text(FAKE_PYTHON)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def launch(
    script: str, args: list[str], fake_python: Path, tmp_path: Path, cwd: Path | None = None, **env: str
):
    """Run a script with the fake interpreter; returns (completed process, recorded argv or None)."""
    argv_file = tmp_path / "argv.txt"
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHON", "NPROC_PER_NODE")}
    environment.update({"PYTHON": str(fake_python), "FAKE_ARGV_FILE": str(argv_file), **env})
    completed = subprocess.run(
        ["bash", str(SCRIPTS / script), *args],
        cwd=cwd or tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
    )
    recorded = argv_file.read_text().splitlines() if argv_file.exists() else None
    return completed, recorded


def value_after(argv: list[str], flag: str) -> str:
    return argv[len(argv) - 1 - argv[::-1].index(flag) + 1]  # the last occurrence wins, as in argparse


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_strict_bash_and_help(script, fake_python, tmp_path):
    text = (SCRIPTS / script).read_text()
    assert "set -euo pipefail" in text
    assert subprocess.run(["bash", "-n", str(SCRIPTS / script)]).returncode == 0
    completed, recorded = launch(script, ["-h"], fake_python, tmp_path)
    assert completed.returncode == 0 and recorded is None
    for option in (
        "-m, --model",
        "-d, --data",
        "--deepspeed",
        "-h, --help",
        "NNODES",
        "NODE_RANK",
        "MASTER_ADDR",
    ):
        assert option in completed.stdout, option


@pytest.mark.parametrize("script", ALL_SCRIPTS)
@pytest.mark.parametrize("args", [[], ["-m", "model"], ["-d", "data.json"], ["-m"]])
def test_missing_model_or_data_is_a_usage_error(script, args, fake_python, tmp_path):
    completed, recorded = launch(script, args, fake_python, tmp_path)
    assert completed.returncode == 2 and recorded is None
    assert "error:" in completed.stderr and "Usage:" in completed.stderr


@pytest.mark.parametrize("script", TORCHRUN_SCRIPTS)
def test_torchrun_layout_from_environment(script, fake_python, tmp_path):
    env = {
        "NNODES": "2",
        "NODE_RANK": "1",
        "MASTER_ADDR": "10.0.0.7",
        "MASTER_PORT": "29999",
        "FAKE_GPUS": "4",
    }
    completed, argv = launch(script, ["-m", "M", "-d", "D"], fake_python, tmp_path, **env)
    assert completed.returncode == 0, completed.stderr
    assert argv[:2] == ["-m", "torch.distributed.run"]
    layout = {flag: value_after(argv, flag) for flag in ("--nproc_per_node", "--nnodes", "--node_rank")}
    assert layout == {"--nproc_per_node": "4", "--nnodes": "2", "--node_rank": "1"}
    assert value_after(argv, "--master_addr") == "10.0.0.7" and value_after(argv, "--master_port") == "29999"
    assert argv[argv.index("--master_port") + 2] == str(REPO_ROOT / "finetune.py")


@pytest.mark.parametrize("script", TORCHRUN_SCRIPTS)
def test_process_count_cpu_fallback_and_override(script, fake_python, tmp_path):
    completed, argv = launch(script, ["-m", "M", "-d", "D"], fake_python, tmp_path, FAKE_GPUS="0")
    assert value_after(argv, "--nproc_per_node") == "1"
    assert "no GPU found" in completed.stderr
    assert (value_after(argv, "--nnodes"), value_after(argv, "--master_addr")) == ("1", "localhost")
    _, argv = launch(script, ["-m", "M", "-d", "D"], fake_python, tmp_path, FAKE_GPUS="8", NPROC_PER_NODE="3")
    assert value_after(argv, "--nproc_per_node") == "3"


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_model_data_deepspeed_and_pass_through(script, fake_python, tmp_path):
    args = ["--model", "/models/qwen", "--data", "a.json,b.jsonl", "--output_dir", "out", "--bf16", "False"]
    completed, argv = launch(script, args, fake_python, tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert (script in SINGLE_SCRIPTS) == ("torch.distributed.run" not in argv)
    assert value_after(argv, "--model_name_or_path") == "/models/qwen"
    assert value_after(argv, "--data_path") == "a.json,b.jsonl"
    # extra flags come after the script's defaults, so they win
    assert value_after(argv, "--output_dir") == "out" and value_after(argv, "--bf16") == "False"
    assert argv.index("--output_dir") < len(argv) - 4
    expected = DEFAULT_CONFIG[script]
    if expected is None:
        assert "--deepspeed" not in argv
    else:
        assert value_after(argv, "--deepspeed") == str(SCRIPTS / expected)
    assert ("--use_lora" in argv) == ("lora" in script)
    assert ("--q_lora" in argv) == ("qlora" in script)


@pytest.mark.parametrize("script", ALL_SCRIPTS)
def test_deepspeed_option(script, fake_python, tmp_path):
    _, argv = launch(script, ["-m", "M", "-d", "D", "--deepspeed", "my_ds.json"], fake_python, tmp_path)
    assert value_after(argv, "--deepspeed") == "my_ds.json"
    _, argv = launch(script, ["-m", "M", "-d", "D", "--deepspeed", "none"], fake_python, tmp_path)
    assert "--deepspeed" not in argv


def test_runs_from_any_directory_with_python_from_path(fake_python, tmp_path):
    """Without $PYTHON the scripts use `python` from PATH (the activated venv), from any cwd."""
    argv_file = tmp_path / "argv.txt"
    env = {key: value for key, value in os.environ.items() if key != "PYTHON"}
    env.update({"PATH": f"{fake_python.parent}:{env['PATH']}", "FAKE_ARGV_FILE": str(argv_file)})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    completed = subprocess.run(
        ["bash", str(SCRIPTS / "finetune_lora_ds.sh"), "-m", "M", "-d", "D"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    assert completed.returncode == 0, completed.stderr
    argv = argv_file.read_text().splitlines()
    assert str(REPO_ROOT / "finetune.py") in argv
    assert value_after(argv, "--deepspeed") == str(SCRIPTS / "ds_config_zero2.json")


def test_original_hyperparameters():
    """The scripts keep the original recipes (learning rates, batch sizes, precision)."""
    expectations = {
        "finetune_ds.sh": ["--learning_rate 1e-5", "--gradient_accumulation_steps 16", "--bf16 True"],
        "finetune_lora_ds.sh": ["--learning_rate 3e-4", "--use_lora", "--bf16 True"],
        "finetune_lora_single_gpu.sh": ["--learning_rate 3e-4", "--use_lora", "--bf16 True"],
        "finetune_qlora_ds.sh": ["--q_lora", "--fp16 True"],
        "finetune_qlora_single_gpu.sh": ["--q_lora", "--fp16 True"],
    }
    for script, fragments in expectations.items():
        text = " ".join((SCRIPTS / script).read_text().split())
        for fragment in fragments + ["--model_max_length 512", "--warmup_ratio 0.01", "--adam_beta2 0.95"]:
            assert fragment in text, (script, fragment)

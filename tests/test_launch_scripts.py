"""The finetune/*.sh launch scripts: options, interpreter choice, node layout and the command they run.

A stand-in interpreter (tests/launch_helpers.py) answers the scripts' probes and records the command
line it was given, so these tests check what would run without training anything (the training tests
run the scripts for real; test_recipes.py checks that they resolve the same settings as before)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import launch_helpers as helpers
import pytest

FINETUNE = helpers.REPO_ROOT / "finetune"
TORCHRUN_SCRIPTS = sorted(helpers.TORCHRUN_SCRIPTS)
SINGLE_SCRIPTS = [script for script in helpers.SCRIPTS if script not in helpers.TORCHRUN_SCRIPTS]


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    return helpers.write_fake_python(tmp_path / "bin")


def value_after(argv: list[str], flag: str) -> str:
    return argv[len(argv) - 1 - argv[::-1].index(flag) + 1]  # the last occurrence wins, as in argparse


@pytest.mark.parametrize("script", helpers.SCRIPTS)
def test_help_describes_options_and_environment(script, fake_python, tmp_path):
    assert subprocess.run(["bash", "-n", str(FINETUNE / script)]).returncode == 0
    launched = helpers.launch(FINETUNE / script, ["-h"], tmp_path, python=fake_python)
    assert launched.completed.returncode == 0 and launched.argv is None
    for option in (
        "-m, --model",
        "-d, --data",
        "--deepspeed",
        "-h, --help",
        "NNODES",
        "NODE_RANK",
        "MASTER_ADDR",
    ):
        assert option in launched.completed.stdout, option
    assert "finetune/recipes/" in launched.completed.stdout


@pytest.mark.parametrize("script", helpers.SCRIPTS)
@pytest.mark.parametrize("args", [[], ["-m", "model"], ["-d", "data.json"], ["-m"]])
def test_missing_model_or_data_is_a_usage_error(script, args, fake_python, tmp_path):
    launched = helpers.launch(FINETUNE / script, args, tmp_path, python=fake_python)
    assert launched.completed.returncode == 2 and launched.argv is None
    assert "error:" in launched.completed.stderr and "Usage:" in launched.completed.stderr


@pytest.mark.parametrize("script", TORCHRUN_SCRIPTS)
def test_process_count_cpu_fallback_and_thread_default(script, fake_python, tmp_path):
    launched = helpers.launch(FINETUNE / script, ["-m", "M", "-d", "D"], tmp_path, python=fake_python)
    assert value_after(launched.argv, "--nproc_per_node") == "1"
    assert "no GPU found" in launched.completed.stderr
    assert "OMP_NUM_THREADS" not in launched.environment  # one process: torch decides, as before
    launched = helpers.launch(
        FINETUNE / script, ["-m", "M", "-d", "D"], tmp_path, python=fake_python, FAKE_GPUS="2"
    )
    assert value_after(launched.argv, "--nproc_per_node") == "2"
    assert launched.environment["OMP_NUM_THREADS"] == "1"  # what torchrun would set, without its banner
    launched = helpers.launch(
        FINETUNE / script,
        ["-m", "M", "-d", "D"],
        tmp_path,
        python=fake_python,
        NPROC_PER_NODE="3",
        OMP_NUM_THREADS="4",
    )
    assert (
        value_after(launched.argv, "--nproc_per_node") == "3"
        and launched.environment["OMP_NUM_THREADS"] == "4"
    )


@pytest.mark.parametrize("script", helpers.SCRIPTS)
def test_deepspeed_option_and_pass_through(script, fake_python, tmp_path):
    args = [
        "--model",
        "/models/qwen",
        "--data",
        "a.json,b.jsonl",
        "--deepspeed",
        "my_ds.json",
        "--bf16",
        "False",
    ]
    launched = helpers.launch(FINETUNE / script, args, tmp_path, python=fake_python)
    _, finetune_args = helpers.split_command(launched.argv)
    assert value_after(finetune_args, "--model_name_or_path") == "/models/qwen"
    assert value_after(finetune_args, "--data_path") == "a.json,b.jsonl"
    assert value_after(finetune_args, "--deepspeed") == "my_ds.json"
    assert finetune_args[-2:] == ["--bf16", "False"]  # after the recipe and the script's flags: it wins
    launched = helpers.launch(
        FINETUNE / script, ["-m", "M", "-d", "D", "--deepspeed", "none"], tmp_path, python=fake_python
    )
    assert "--deepspeed" not in launched.argv


def test_runs_from_any_directory_with_the_activated_environment(fake_python, tmp_path):
    """With an activated environment and no $PYTHON, the scripts run `python` from PATH, from any cwd."""
    path = f"{fake_python.parent}:{os.environ['PATH']}"
    launched = helpers.launch(
        FINETUNE / "finetune_lora_ds.sh", ["-m", "M", "-d", "D"], tmp_path / "elsewhere", python=None,
        VIRTUAL_ENV=str(tmp_path), PATH=path,
    )  # fmt: skip
    assert launched.completed.returncode == 0, launched.completed.stderr
    assert launched.argv[launched.argv.index("--master_port") + 2] == str(helpers.REPO_ROOT / "finetune.py")
    assert value_after(launched.argv, "--deepspeed") == str(FINETUNE / "ds_config_zero2.json")


def copy_scripts(repo: Path) -> Path:
    """The launch scripts and recipes in another repository directory (finetune.py is not needed)."""
    shutil.copytree(FINETUNE, repo / "finetune", ignore=shutil.ignore_patterns("*.json"))
    return repo / "finetune"


def test_without_an_activated_environment_the_repository_venv_is_used(tmp_path):
    scripts = copy_scripts(tmp_path / "repo")
    venv_python = helpers.write_fake_python(tmp_path / "repo" / ".venv" / "bin")
    launched = helpers.launch(
        scripts / "finetune_lora_single_gpu.sh", ["-m", "M", "-d", "D"], tmp_path / "cwd", python=None
    )
    assert launched.completed.returncode == 0, launched.completed.stderr
    assert f"one process: {venv_python} finetune.py" in launched.completed.stderr
    assert launched.argv[0] == str(tmp_path / "repo" / "finetune.py")


@pytest.mark.parametrize("script", ["finetune_lora_ds.sh", "finetune_lora_single_gpu.sh"])
def test_an_interpreter_without_torch_stops_with_one_line(script, tmp_path):
    """No activated environment and no .venv: python3 from PATH, which here lacks torch."""
    scripts = copy_scripts(tmp_path / "repo")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(helpers.write_fake_python(tmp_path / "fake"))
    launched = helpers.launch(
        scripts / script, ["-m", "M", "-d", "D"], tmp_path / "cwd", python=None,
        PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_NO_TORCH="1",
    )  # fmt: skip
    assert launched.completed.returncode == 1 and launched.argv is None
    lines = launched.completed.stderr.splitlines()
    assert len(lines) == 1 and "scripts/setup.sh" in lines[0] and "torch" in lines[0], lines

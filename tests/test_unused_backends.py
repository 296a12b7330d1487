"""finetune.py leaves the quantization packages of the backends a run does not use unimported.

The flag reading is checked against the parser's own rules (recipes under the command line, dashed
names, bare booleans) and against transformers' list of bitsandbytes optimizers; two real runs in
child processes show what ends up imported: a LoRA run loads neither bitsandbytes nor gptqmodel,
an NF4 Q-LoRA run loads bitsandbytes (and trains) but not gptqmodel.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import train_helpers as helpers

from qwen_finetune.errors import ArgumentError
from qwen_finetune.unused_backends import deciding_flag_values, hide_unused_backends, packages_in_use

GPTQ = {"gptqmodel", "optimum"}
NF4 = {"bitsandbytes"}
RECIPES = helpers.REPO_ROOT / "finetune" / "recipes"


def used_by(*argv: str) -> set[str]:
    return packages_in_use(deciding_flag_values(list(argv)))


@pytest.mark.parametrize(
    ("argv", "used"),
    [
        (["--use_lora", "--model_name_or_path", "m"], set()),
        (["--use_lora", "True", "--q_lora"], GPTQ),
        (["--q_lora", "--use_lora"], GPTQ),
        (["--q_lora", "false"], set()),
        (["--q_lora=yes", "--q_lora_backend", "nf4"], NF4),
        (["--q-lora", "--q-lora-backend=nf4"], NF4),
        (["--q_lora", "--q_lora_backend", "gptq", "--q_lora_backend", "nf4"], NF4),  # the last one wins
        (["--optim", "paged_adamw_8bit"], NF4),
        (["--optim=adamw_torch_fused", "--use_lora"], set()),
        (["--q_lora", "--q_lora_backend", "int3"], GPTQ | NF4),  # refused by the parser later: hide nothing
    ],
)
def test_flags_decide_the_packages_in_use(argv, used):
    assert used_by(*argv) == used


def test_recipe_files_count_and_the_command_line_overrides_them(tmp_path):
    qlora = str(RECIPES / "qlora.yaml")  # q_lora: true, by way of `extends: lora.yaml`
    assert used_by("--config", qlora) == GPTQ
    assert used_by("--config", qlora, "--q_lora_backend", "nf4") == NF4
    assert used_by("--config", qlora, "--q_lora", "false") == set()
    assert used_by("--config", str(RECIPES / "lora.yaml")) == set()
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"extends": str(RECIPES / "qlora.yaml"), "optim": "lion_32bit"}))
    assert used_by("--config", str(mine), "--q_lora_backend", "nf4") == NF4
    assert used_by(f"--config={mine}") == GPTQ | NF4


def test_every_bitsandbytes_optimizer_of_transformers_keeps_the_package():
    from transformers.trainer_optimizer import _BITSANDBYTES_OPTIMIZERS

    assert len(_BITSANDBYTES_OPTIMIZERS) > 10
    for name in _BITSANDBYTES_OPTIMIZERS:
        assert used_by("--use_lora", "--optim", name.value) == NF4, name.value


def test_unreadable_flags_hide_nothing(tmp_path):
    assert hide_unused_backends(["--config", str(tmp_path / "missing.yaml"), "--use_lora"]) == []


def test_abbreviated_flags_are_refused_by_name(tiny_chat_checkpoint):
    """Flags are read before parsing by their full names, so the parser must not accept prefixes."""
    from qwen_finetune.args import parse_run_arguments

    with pytest.raises(ArgumentError, match="--q_lora_back.*did you mean --q_lora_backend"):
        parse_run_arguments(["--model_name_or_path", str(tiny_chat_checkpoint), "--q_lora_back", "nf4"])


# Runs finetune.py as its own process would, then prints which of the packages got imported.
IMPORTED_AT_EXIT = """
import atexit, json, runpy, sys
def report():
    loaded = sorted(name for name in ("bitsandbytes", "gptqmodel", "peft") if sys.modules.get(name) is not None)
    print("IMPORTED " + json.dumps(loaded), file=sys.stderr)
atexit.register(report)
sys.argv = ["finetune.py", *sys.argv[1:]]
runpy.run_path("finetune.py", run_name="__main__")
"""


def imported_by_run(extra: list[str], checkpoint: Path, output: Path) -> list[str]:
    argv = ["--model_name_or_path", str(checkpoint), "--data_path", "data/example.json"]
    argv += ["--output_dir", str(output), "--max_steps", "2", "--model_max_length", "96"]
    argv += ["--per_device_train_batch_size", "2", "--save_strategy", "no", "--learning_rate", "1e-3"]
    completed = subprocess.run(
        [sys.executable, "-c", IMPORTED_AT_EXIT, *argv, *extra],
        cwd=helpers.REPO_ROOT,
        env=helpers.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert (output / "train_summary.json").is_file(), completed.stderr[-4000:]
    lines = [line for line in completed.stderr.splitlines() if line.startswith("IMPORTED ")]
    assert len(lines) == 1, completed.stderr[-4000:]
    return list(json.loads(lines[0].removeprefix("IMPORTED ")))


@pytest.mark.slow
def test_lora_run_imports_no_quantization_package(tiny_chat_checkpoint, tmp_path):
    assert imported_by_run(["--use_lora"], tiny_chat_checkpoint, tmp_path / "lora") == ["peft"]


@pytest.mark.slow
def test_nf4_run_imports_bitsandbytes_alone(tiny_chat_checkpoint, tmp_path):
    flags = ["--use_lora", "--q_lora", "--q_lora_backend", "nf4", "--bf16", "false"]
    assert imported_by_run(flags, tiny_chat_checkpoint, tmp_path / "nf4") == ["bitsandbytes", "peft"]

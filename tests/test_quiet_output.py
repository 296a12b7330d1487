"""At the default verbosity every command prints only the toolkit's own lines, progress bars and errors.

Each entry point runs in a subprocess (--help, then a tiny chain: LoRA training through a launch
script, merge, GPTQ quantization, chat on the quantized model, and a DeepSpeed run through torchrun);
a test fails when the output has a line that matches a known third-party noise pattern, and names
the line and the pattern. QWEN_QUIET_CHECK_REPO=DIR runs the same commands from another checkout
(with this interpreter), e.g. to see what an older version printed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import train_helpers as helpers

REPO = Path(os.environ.get("QWEN_QUIET_CHECK_REPO", helpers.REPO_ROOT)).resolve()
DATA = "data/example.json"

# (what prints it, pattern): lines a user cannot act on, from libraries the toolkit uses.
NOISE_PATTERNS = [
    ("torchao: its GPU kernels do not load on this machine", r"Failed to load .*\.so"),
    ("bitsandbytes: optional CPU kernel from the hub", r"kernels-community"),
    ("torch logging (glog-style W/I/E lines)", r"^[WIE]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+\.py:\d+\]"),
    ("gptqmodel banner", r"GPT-QModel|^\s*[┌│└].*[┐│┘]\s*$"),
    ("gptqmodel/LogBar log lines", r"^(INFO|WARN|ERROR)\s{1,2}\S|GIL is enabled|ENV: Auto setting"),
    ("a Python warning", r"\b(Future|User|Deprecation|Runtime|Resource)Warning\b|^\s+warnings\.warn\("),
    ("DeepSpeed's logger", r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\] \[(INFO|WARNING)\]"),
    ("DeepSpeed prints", r"Setting accelerator to|DeepSpeed .* built successfully|Time to load .* op"),
    ("torch extension builds", r"Emitting ninja build file|Loading extension module|torch_extensions"),
    ("torchrun's thread banner", r"Setting OMP_NUM_THREADS environment variable|^\*{20,}$"),
    ("transformers' logger", r"^\[transformers\]"),
    ("a library logger in logging's default format", r"^(DEBUG|INFO|WARNING|ERROR):[\w.]+:"),
]


def noise_lines(output: str) -> list[str]:
    found = []
    for line in re.split(r"[\r\n]+", output):
        for source, pattern in NOISE_PATTERNS:
            if re.search(pattern, line):
                found.append(f"{source}: {line.strip()[:200]}")
                break
    return found


def run(command: list[str], workdir: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    env = helpers.subprocess_env()
    for name in ("QWEN_FINETUNE_VERBOSE", "TRANSFORMERS_VERBOSITY", "PYTHONWARNINGS"):
        env.pop(name, None)
    env.update(extra, PYTHONPATH=str(REPO))
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200, stdin=subprocess.DEVNULL
    )


def assert_quiet(completed: subprocess.CompletedProcess[str]) -> None:
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-4000:]
    noise = noise_lines(output)
    assert not noise, "third-party noise:\n" + "\n".join(noise)


# A library's warning, a library's logged warning and the toolkit's own, after the console is set up.
EMIT = """
import logging, sys, warnings
from qwen_finetune.console import configure_console
configure_console(sys.argv[1:])
warnings.warn_explicit("library-warning", FutureWarning, "training_args.py", 1, module="transformers.training_args")
logging.getLogger("DeepSpeed").warning("library-log")
logging.getLogger("qwen_finetune").warning("own-log")
"""


@pytest.mark.parametrize(
    ("argv", "env", "shown"),
    [
        ([], {}, {"own-log"}),
        (["--verbose"], {}, {"own-log", "library-log", "library-warning"}),
        (["--verbose", "false"], {"QWEN_FINETUNE_VERBOSE": "1"}, {"own-log"}),
        ([], {"QWEN_FINETUNE_VERBOSE": "1"}, {"own-log", "library-log", "library-warning"}),
    ],
)
def test_verbose_shows_third_party_output(tmp_path, argv, env, shown):
    completed = run([sys.executable, "-c", EMIT, *argv], tmp_path, **env)
    markers = {"own-log", "library-log", "library-warning"}
    assert {marker for marker in markers if marker in completed.stderr} == shown, completed.stderr


def test_help_is_quiet(tmp_path):
    assert_quiet(run([sys.executable, "finetune.py", "--help"], tmp_path))


@pytest.fixture(scope="module")
def chain(tiny_chat_checkpoint, tmp_path_factory) -> dict[str, subprocess.CompletedProcess[str]]:
    """The after-training chain on the tiny model, each step's process by name; a failed step ends it."""
    work = tmp_path_factory.mktemp("quiet")
    steps = {
        "train": ["bash", "finetune/finetune_lora_single_gpu.sh", "-m", str(tiny_chat_checkpoint), "-d", DATA]
        + ["--output_dir", str(work / "lora"), "--max_steps", "2", "--bf16", "false", "--save_strategy", "no"]
        + ["--model_max_length", "128", "--gradient_accumulation_steps", "1"]
        + ["--data_cache_dir", str(work / "cache")],
        "merge": [sys.executable, "merge_lora.py", "--adapter_dir", str(work / "lora")]
        + ["--output_dir", str(work / "merged")],
        "quantize": [sys.executable, "run_gptq.py", "--model_name_or_path", str(work / "merged")]
        + ["--data_path", DATA, "--out_path", str(work / "int4"), "--bits", "4", "--group-size", "32"]
        + ["--max_len", "128"],
        "chat": [sys.executable, "cli_demo.py", "-c", str(work / "int4"), "--query", "Who are you?"]
        + ["--max_new_tokens", "4"],
    }
    results: dict[str, subprocess.CompletedProcess[str]] = {}
    for name, command in steps.items():
        results[name] = run(command, work)
        if results[name].returncode != 0:
            break
    return results


@pytest.mark.slow
@pytest.mark.parametrize("step", ["train", "merge", "quantize", "chat"])
def test_after_training_chain_is_quiet(chain, step):
    if step not in chain:
        pytest.fail(f"an earlier step of the chain failed: {[name for name in chain][-1]}")
    assert_quiet(chain[step])


@pytest.mark.slow
@pytest.mark.distributed
def test_deepspeed_run_through_torchrun_is_quiet(tiny_chat_checkpoint, tmp_path):
    command = ["bash", "finetune/finetune_lora_ds.sh", "-m", str(tiny_chat_checkpoint), "-d", DATA]
    command += ["--output_dir", str(tmp_path / "lora"), "--max_steps", "1", "--bf16", "false"]
    command += [
        "--save_strategy",
        "no",
        "--model_max_length",
        "128",
        "--data_cache_dir",
        str(tmp_path / "cache"),
    ]
    assert_quiet(run(command, tmp_path, NPROC_PER_NODE="1", MASTER_PORT=str(helpers.free_port())))

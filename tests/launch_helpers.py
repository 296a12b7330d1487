"""Launch scripts under a stand-in interpreter, and the settings a finetune.py command line resolves to.

The stand-in answers the scripts' interpreter probes and records the command line it is asked to run,
so a test sees exactly what a script would start without training anything. `resolve` turns finetune.py
command lines into their effective settings (every field of the four argument dataclasses), in a fresh
interpreter of the checkout under test, so no state leaks between checkouts or test cases.

As a command it records a reference: what one checkout's scripts and parser resolve for every case of
`cases()` (this is how tests/fixtures/launch_resolution.json was written):

    git archive REV | tar -x -C /tmp/before
    .venv/bin/python tests/launch_helpers.py reference --checkout /tmp/before --out FILE
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = [
    "finetune_ds.sh",
    "finetune_lora_ds.sh",
    "finetune_lora_single_gpu.sh",
    "finetune_qlora_ds.sh",
    "finetune_qlora_single_gpu.sh",
]
TORCHRUN_SCRIPTS = {"finetune_ds.sh", "finetune_lora_ds.sh", "finetune_qlora_ds.sh"}

# `-c CODE` is a probe (the GPU count, or whether the environment is usable): answered from
# $FAKE_GPUS, or failed like an interpreter without torch when $FAKE_NO_TORCH is set. Anything else
# is the command a script runs: recorded, NUL-separated, in $FAKE_ARGV_FILE, its environment beside it.
FAKE_PYTHON = """#!/usr/bin/env bash
if [[ "$1" == "-c" ]]; then
    if [[ -n "${FAKE_NO_TORCH:-}" ]]; then echo "ModuleNotFoundError: No module named 'torch'" >&2; exit 1; fi
    echo "${FAKE_GPUS:-0}"
    exit 0
fi
printf '%s\\0' "$@" > "$FAKE_ARGV_FILE"
env -0 > "$FAKE_ARGV_FILE.env"
"""

# The environment a script sees unless a test says otherwise: no interpreter chosen, no node layout.
LAUNCH_VARIABLES = (
    "PYTHON",
    "VIRTUAL_ENV",
    "CONDA_PREFIX",
    "NPROC_PER_NODE",
    "NNODES",
    "NODE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "CUDA_VISIBLE_DEVICES",
    "OMP_NUM_THREADS",
    "FAKE_GPUS",
    "FAKE_NO_TORCH",
)

MULTINODE = {"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29999"}
MULTINODE_GPUS = {**MULTINODE, "FAKE_GPUS": "4"}

# What users add after a script's own options: nothing, the usual overrides, the current names of
# flags the earlier scripts passed under their old names (and the old names), DeepSpeed choices,
# LoRA settings. "{finetune}" stands
# for the checkout's finetune/ directory.
USER_FLAGS: list[tuple[str, list[str], dict[str, str]]] = [
    ("defaults", [], {}),
    ("overrides", ["--output_dir", "run1", "--num_train_epochs", "1", "--bf16", "False"], MULTINODE_GPUS),
    (
        "new_names",
        ["--eval_strategy", "steps", "--eval_steps", "5", "--warmup_steps", "7", "--learning_rate", "1e-4"],
        {"NPROC_PER_NODE": "3"},
    ),
    (
        "old_names",
        ["--evaluation_strategy", "epoch", "--warmup_ratio", "0.05", "--gradient_checkpointing", "False"],
        {},
    ),
    (
        "deepspeed_and_data",
        ["--deepspeed", "{finetune}/ds_config_zero3_offload.json", "--model_max_length", "1024"]
        + ["--lazy_preprocess", "True", "--save_steps", "50", "--report_to", "tensorboard"],
        {},
    ),
    ("no_deepspeed", ["--deepspeed", "none", "--lora_r", "8", "--lora_target_modules", "c_attn", "w1"], {}),
]


def cases() -> list[dict[str, Any]]:
    """Every launch script with every set of user flags."""
    return [
        {"name": f"{script}:{name}", "script": script, "args": args, "env": env}
        for script in SCRIPTS
        for name, args, env in USER_FLAGS
    ]


def write_fake_python(directory: Path) -> Path:
    """The stand-in interpreter, as `directory/python`."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "python"
    path.write_text(FAKE_PYTHON)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


@dataclass
class Launched:
    """A finished launch script: its process, and the command it ran with that command's environment
    (both None when it ran nothing)."""

    completed: subprocess.CompletedProcess[str]
    argv: list[str] | None
    environment: dict[str, str] | None


def launch(script: Path, args: list[str], workdir: Path, *, python: Path | None, **env: str) -> Launched:
    """Run a launch script in `workdir` with `python` as $PYTHON (None: $PYTHON unset) and `env` added."""
    workdir.mkdir(parents=True, exist_ok=True)
    argv_file = workdir / "argv.bin"
    environment_file = workdir / "argv.bin.env"
    argv_file.unlink(missing_ok=True)
    environment_file.unlink(missing_ok=True)
    environment = {key: value for key, value in os.environ.items() if key not in LAUNCH_VARIABLES}
    environment["FAKE_ARGV_FILE"] = str(argv_file)
    if python is not None:
        environment["PYTHON"] = str(python)
    environment.update(env)
    completed = subprocess.run(
        ["bash", str(script), *args], cwd=workdir, env=environment, capture_output=True, text=True, timeout=60
    )
    if not argv_file.exists():
        return Launched(completed, None, None)
    recorded_environment = dict(
        item.split("=", 1) for item in environment_file.read_text().split("\0") if "=" in item
    )
    return Launched(completed, argv_file.read_text().split("\0")[:-1], recorded_environment)


def split_command(recorded: list[str]) -> tuple[list[str], list[str]]:
    """(launcher arguments before finetune.py, finetune.py's own arguments)."""
    position = next(index for index, item in enumerate(recorded) if Path(item).name == "finetune.py")
    return recorded[:position], recorded[position + 1 :]


def with_checkout(args: list[str], checkout: Path) -> list[str]:
    return [item.replace("{finetune}", str(checkout / "finetune")) for item in args]


def resolve(argvs: list[list[str]], checkout: Path) -> list[dict[str, Any]]:
    """The effective settings of each finetune.py command line, as the checkout's parser resolves them
    on a machine without an accelerator; {"error": message} for a command line it refuses."""
    environment = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH",)}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "TENSORBOARD_LOGGING_DIR", "ACCELERATE_USE_DEEPSPEED"):
        environment.pop(key, None)
    environment["PYTHONPATH"] = str(checkout)
    completed = subprocess.run(
        [sys.executable, __file__, "resolve"],
        input=json.dumps(argvs),
        cwd=checkout,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if completed.returncode != 0:
        raise RuntimeError(f"resolving failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.splitlines()[-1])


def _resolve_here(argvs: list[list[str]]) -> list[dict[str, Any]]:
    """Runs inside `resolve`'s interpreter."""
    import dataclasses

    import torch

    torch.accelerator.is_available = lambda: False  # as on the machine that recorded the reference

    from qwen_finetune.args import parse_args
    from qwen_finetune.errors import ToolkitError

    results: list[dict[str, Any]] = []
    for argv in argvs:
        try:
            model_args, data_args, training_args, lora_args = parse_args(argv)
        except (ToolkitError, ValueError) as error:
            results.append({"error": str(error)})
            continue
        settings = {
            "model": dataclasses.asdict(model_args),
            "data": dataclasses.asdict(data_args),
            "training": training_args.to_dict(),
            "lora": dataclasses.asdict(lora_args),
        }
        results.append(json.loads(json.dumps(settings, default=str)))
    return results


def record_reference(checkout: Path, workdir: Path) -> dict[str, Any]:
    """What `checkout`'s scripts run and its parser resolves, for every case; and for every script,
    its finetune.py flags given straight to finetune.py (as users of `torchrun finetune.py` do).
    Settings are stored as their changes from those of an empty command line (`defaults`)."""
    entries: list[dict[str, Any]] = []
    python = write_fake_python(workdir / "fake-bin")
    for case in cases():
        args = ["-m", "M", "-d", "D", *with_checkout(case["args"], checkout)]
        script = checkout / "finetune" / case["script"]
        launched = launch(script, args, workdir, python=python, **case["env"])
        if launched.argv is None or launched.environment is None:
            raise RuntimeError(f"{case['name']}: the script ran nothing:\n{launched.completed.stderr}")
        launcher, finetune_args = split_command(launched.argv)
        devices = launched.environment.get("CUDA_VISIBLE_DEVICES")
        entries.append({**case, "launcher": launcher, "cuda_visible_devices": devices})
        entries[-1]["finetune_args"] = finetune_args
    direct = []
    for script in SCRIPTS:
        defaults = next(entry for entry in entries if entry["name"] == f"{script}:defaults")
        flags = [*defaults["finetune_args"], "--lazy_preprocess", "True"]
        direct.append({"name": f"{script}:direct", "argv": flags})
    argvs = [[]] + [entry["finetune_args"] for entry in entries] + [item["argv"] for item in direct]
    defaults, *settings = resolve(argvs, checkout)
    for entry, resolved in zip(entries + direct, settings, strict=True):
        entry["settings"] = changes(defaults, resolved)
    for item in direct:  # stored with the placeholder, so that any checkout can replay it
        item["argv"] = [arg.replace(str(checkout / "finetune"), "{finetune}") for arg in item["argv"]]
    for entry in entries:
        entry["launcher"] = [arg.replace(str(checkout), "{checkout}") for arg in entry["launcher"]]
        del entry["finetune_args"]
    return {"defaults": defaults, "cases": entries, "direct": direct}


def changes(defaults: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """The settings that differ from `defaults`, per group; a refusal is kept whole."""
    if "error" in settings:
        return settings
    return {
        group: {name: value for name, value in values.items() if defaults[group].get(name, object()) != value}
        for group, values in settings.items()
    }


def overlay(defaults: dict[str, Any], recorded_changes: dict[str, Any]) -> dict[str, Any]:
    """The inverse of `changes`: full settings from the defaults and the recorded changes."""
    if "error" in recorded_changes:
        return recorded_changes
    return {group: {**values, **recorded_changes.get(group, {})} for group, values in defaults.items()}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "resolve", help="read a JSON list of finetune.py command lines on stdin, print settings"
    )
    reference = commands.add_parser("reference", help="record the reference of a checkout")
    reference.add_argument("--checkout", type=Path, required=True)
    reference.add_argument("--out", type=Path, required=True)
    reference.add_argument("--note", default="", help="how the checkout was made (stored in the file)")
    args = parser.parse_args()
    if args.command == "resolve":
        print(json.dumps(_resolve_here(json.loads(sys.stdin.read()))))
        return 0
    import tempfile

    with tempfile.TemporaryDirectory() as workdir:
        recorded = record_reference(args.checkout.resolve(), Path(workdir))
    recorded = {"note": args.note, **recorded}
    args.out.write_text(json.dumps(recorded, indent=1, sort_keys=False) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

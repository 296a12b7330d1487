"""run_info.json: the command and the package versions of every session of a run (the first one, then
one per resume), so a report says exactly what produced its numbers."""

from __future__ import annotations

import datetime
import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from qwen_finetune.json_files import read_json

from .files import write_atomically

RUN_INFO_FILE = "run_info.json"
# The distributions whose versions decide what a run computes, as pip names them.
RECORDED_PACKAGES = (
    "qwen-finetune",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "deepspeed",
    "datasets",
    "tiktoken",
    "bitsandbytes",
    "gptqmodel",
    "optimum",
    "flash-attn",
)


def package_versions() -> dict[str, str]:
    """Python and each recorded package that is installed (absent ones are left out)."""
    versions = {"python": platform.python_version()}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} ({device})"
    return f"{device} ({platform.processor() or platform.machine()})"


def session_info(start_step: int, processes: int, device: torch.device) -> dict[str, Any]:
    return {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "start_step": start_step,
        "command": [sys.executable, *sys.argv],
        "processes": processes,
        "device": device_description(device),
        "versions": package_versions(),
    }


def record_session(output_dir: Path, session: dict[str, Any]) -> None:
    """Append `session` to run_info.json; a session that starts at step 0 begins a new run (the file
    of an earlier run in an overwritten directory is replaced)."""
    path = output_dir / RUN_INFO_FILE
    sessions = []
    if session["start_step"] > 0 and path.is_file():
        sessions = [
            item for item in read_json(path)["sessions"] if item["start_step"] < session["start_step"]
        ]
    write_atomically(
        path, json.dumps({"sessions": [*sessions, session]}, indent=2, ensure_ascii=False) + "\n"
    )

"""Keep a finetune.py process from importing the quantization packages its run cannot use.

Whenever they are installed, peft imports bitsandbytes while it is itself imported (transformers'
TrainingArguments imports peft, so this happens before the flags are even parsed) and gptqmodel
when it attaches an adapter. A LoRA or full run uses neither, and paid about 0.1 GiB of resident
memory and 2-3 s before its first step for them (bench/README.md). So the few flags that decide
are read here first, as the parser will read them (the --config files, then the command line over
them; full flag names, which the parser requires), and every package of a backend the run does not
use is entered in sys.modules as None: importlib, transformers and peft then see it as absent.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from qwen_finetune.early_flags import last_flag_values
from qwen_finetune.errors import ToolkitError
from qwen_finetune.quant_backends import BACKENDS
from qwen_finetune.recipe_file import read_config, split_config_flags

DECIDING_FLAGS = ("q_lora", "q_lora_backend", "optim")
# --q_lora_backend auto trains on the checkpoint's own GPTQ weights (any other checkpoint is refused).
AUTO_BACKEND = "gptq"
# transformers takes these optimizers from bitsandbytes (adamw_bnb_8bit, paged_adamw_32bit, lion_8bit,
# rmsprop_bnb, ademamix, ...); a name with any of these parts keeps the package importable.
BITSANDBYTES_OPTIMIZER_PARTS = ("bnb", "8bit", "32bit", "paged", "lion", "ademamix")
_TRUE_WORDS = ("true", "yes", "t", "y", "1")
ALL_BACKEND_PACKAGES = frozenset(
    package for backend in BACKENDS.values() for package in backend.required_packages
)


def hide_unused_backends(argv: Sequence[str]) -> list[str]:
    """Mark the installed, not yet imported packages that this run cannot use as absent; returns them.

    Flags that cannot be read (a missing --config file, say) hide nothing: the parser then reports
    them with its own message.
    """
    try:
        used = packages_in_use(deciding_flag_values(argv))
    except ToolkitError:
        return []
    hidden = [
        package
        for package in sorted(ALL_BACKEND_PACKAGES)
        if package not in used
        and package not in sys.modules
        and importlib.util.find_spec(package) is not None
    ]
    for package in hidden:
        sys.modules[package] = None  # type: ignore[assignment]  # importlib's documented "not importable" mark
    return hidden


def packages_in_use(flags: Mapping[str, object]) -> set[str]:
    """The quantization packages that a run with these flag values may import."""
    used: set[str] = set()
    if _is_true(flags.get("q_lora", False)):
        requested = str(flags.get("q_lora_backend", "auto"))
        backend = BACKENDS.get(AUTO_BACKEND if requested == "auto" else requested)
        if backend is None:  # a value the parser will refuse: hide nothing
            return set(ALL_BACKEND_PACKAGES)
        used.update(backend.required_packages)
    optimizer = str(flags.get("optim", "")).lower()
    if any(part in optimizer for part in BITSANDBYTES_OPTIMIZER_PARTS):
        used.add("bitsandbytes")
    return used


def deciding_flag_values(argv: Sequence[str]) -> dict[str, object]:
    """The values of DECIDING_FLAGS that the parser will see: recipe files first, the command line last."""
    files, command_line = split_config_flags(argv)
    values: dict[str, object] = {}
    for name in files:
        for key, (value, _source) in read_config(Path(name)).items():
            if key in DECIDING_FLAGS:
                values[key] = value
    values.update(last_flag_values(command_line, DECIDING_FLAGS))
    return values


def _is_true(value: object) -> bool:
    return str(value).lower() in _TRUE_WORDS  # True from a YAML file reads 'true'

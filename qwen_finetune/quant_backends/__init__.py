"""Q-LoRA base models, one sibling module per quantization backend behind the same small interface.

Each backend says which packages it needs, how `from_pretrained` must load the base, and what its
layers need once the adapter is attached. The training mode decision and the model loader ask the
backend by name instead of branching on it.
"""

from __future__ import annotations

import importlib.util
from typing import Literal

from qwen_finetune.errors import ArgumentError

from . import gptq, nf4
from .base import QuantBackend

Quantization = Literal["gptq", "nf4"]
BACKENDS: dict[str, QuantBackend] = {"gptq": gptq.BACKEND, "nf4": nf4.BACKEND}


def require_packages(name: Quantization) -> None:
    """Fail before any weight is loaded when the backend's packages are not installed."""
    missing = [
        package for package in BACKENDS[name].required_packages if importlib.util.find_spec(package) is None
    ]
    if missing:
        raise ArgumentError(
            f"Q-LoRA with {name} needs {', '.join(missing)}: pip install 'qwen-finetune[{name}]' "
            "(keep torch pinned, e.g. -c constraints.txt)"
        )

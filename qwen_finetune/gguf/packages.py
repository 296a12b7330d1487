"""The optional packages GGUF export needs, with an error that says how to install them."""

from __future__ import annotations

import importlib
from types import ModuleType

from qwen_finetune.errors import ToolkitError

INSTALL_HINTS = {
    "gguf": 'pip install -c constraints.txt -e ".[export]" (or: pip install "gguf>=0.19,<0.20")',
    "llama_cpp": 'pip install -c constraints.txt -e ".[dev]" (or: pip install llama-cpp-python; it builds '
    "llama.cpp from source, a few minutes)",
}


class MissingPackageError(ToolkitError):
    """An optional package the requested work needs is not installed."""


def require(module: str, needed_for: str) -> ModuleType:
    """Import `module` (a key of INSTALL_HINTS) or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackageError(
            f"{needed_for} needs the Python package {module!r}, which is not installed: {INSTALL_HINTS[module]}"
        ) from None

"""The toolkit's commands, as the root scripts (finetune.py, ...) and the console scripts run them.

Each one sets the console up (quiet unless --verbose) before its module, and with it torch and
transformers, is imported: several libraries print while they are imported.
"""

from __future__ import annotations

import sys

from qwen_finetune.console import run_command
from qwen_finetune.unused_backends import hide_unused_backends


def finetune() -> int:
    from qwen_finetune.cli_help import print_finetune_help, wants_help

    # --help is answered from stored text, without importing torch or transformers (fast).
    if wants_help(sys.argv[1:]):
        return print_finetune_help()
    hide_unused_backends(sys.argv[1:])
    return run_command("qwen_finetune.train")


def merge_lora() -> int:
    return run_command("qwen_finetune.merge")


def quantize() -> int:
    return run_command("qwen_finetune.quantize")


def chat() -> int:
    return run_command("qwen_finetune.chat_cli")


def export_gguf() -> int:
    return run_command("qwen_finetune.gguf.export")

"""Fine-tune a Qwen (v1) model: `python finetune.py --help`, reference in docs/training.md."""

import sys

from qwen_finetune import commands

if __name__ == "__main__":
    sys.exit(commands.finetune())

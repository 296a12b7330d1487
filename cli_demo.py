"""Chat with a Qwen checkpoint in the terminal: `python cli_demo.py -c DIR` (see docs/after_training.md)."""

import sys

from qwen_finetune import commands

if __name__ == "__main__":
    sys.exit(commands.chat())

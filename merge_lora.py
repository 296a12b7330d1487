"""Merge a LoRA adapter into its base model: `python merge_lora.py --adapter_dir A --output_dir OUT`."""

import sys

from qwen_finetune import commands

if __name__ == "__main__":
    sys.exit(commands.merge_lora())

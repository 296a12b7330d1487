"""Fine-tune a Qwen (v1) model: `python finetune.py --help`, reference in docs/training.md."""

import sys

from qwen_finetune.train import main

if __name__ == "__main__":
    sys.exit(main())

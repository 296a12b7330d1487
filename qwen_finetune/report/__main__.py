"""`python -m qwen_finetune.report OUTPUT_DIR` (see cli.py)."""

import sys

from qwen_finetune.console import run_command

sys.exit(run_command("qwen_finetune.report.cli"))

"""Export a checkpoint to GGUF for llama.cpp and Ollama: `python export_gguf.py --model_dir DIR --out FILE.gguf --outtype f16`."""

import sys

from qwen_finetune import commands

if __name__ == "__main__":
    sys.exit(commands.export_gguf())

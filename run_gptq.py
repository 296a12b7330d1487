"""GPTQ Int4/Int8 quantization: `python run_gptq.py --model_name_or_path M --data_path D --out_path OUT`."""

import sys

from qwen_finetune import commands

if __name__ == "__main__":
    sys.exit(commands.quantize())

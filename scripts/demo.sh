#!/usr/bin/env bash
# The README demo: set-up, then fine-tune a tiny random-init Qwen chat model on data/example.json until it
# visibly learns the conversations (its answer before and after), then the whole after-training chain
# (LoRA -> merge -> GPTQ Int4 -> Q-LoRA -> chat), and the GGUF export answering in llama.cpp. CPU only;
# about 10 minutes on 2 cores.
# Usage: bash scripts/demo.sh [WORK_DIR]
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

bash scripts/setup.sh

export PYTHON="$REPO_ROOT/.venv/bin/python"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
WORK="${1:-$REPO_ROOT/output/demo}"
QUESTION="Who are you?"
if [[ -e "$WORK" ]]; then
    echo "[demo] $WORK exists: remove it or pass another directory" >&2
    exit 1
fi
mkdir -p "$WORK"

ask() { "$PYTHON" cli_demo.py -c "$1" --query "$QUESTION" --max_new_tokens 48 2>/dev/null; }

printf '\n==== a tiny random-init Qwen chat model (real vocabulary, official layout)\n'
"$PYTHON" -m qwen_model.tiny --out "$WORK/tiny"
printf '\n==== what it says before training: %s\n' "$QUESTION"
ask "$WORK/tiny"

printf '\n==== the data: %s\n' "data/example.json"
"$PYTHON" finetune.py --model_name_or_path "$WORK/tiny" --data_path data/example.json \
    --model_max_length 512 --check_data

printf '\n==== full fine-tuning on data/example.json (30 epochs, dynamic padding)\n'
"$PYTHON" finetune.py --model_name_or_path "$WORK/tiny" --data_path data/example.json \
    --output_dir "$WORK/full" --model_max_length 512 \
    --num_train_epochs 30 --per_device_train_batch_size 4 --learning_rate 3e-3 --weight_decay 0 \
    --lr_scheduler_type cosine --warmup_ratio 0.05 --logging_steps 20 --save_strategy no

printf '\n==== what it says after training: %s\n' "$QUESTION"
ask "$WORK/full"
echo "(the training answer: $("$PYTHON" -c 'import json; print(json.load(open("data/example.json"))[0]["conversations"][1]["value"])'))"

printf '\n==== the after-training chain, starting from the fine-tuned model\n'
bash scripts/demo_chain.sh "$WORK/chain" "$WORK/full"

printf '\n==== export to GGUF for llama.cpp / Ollama (q8_0, checked against PyTorch)\n'
"$PYTHON" export_gguf.py --model_dir "$WORK/full" --out "$WORK/gguf/full-q8_0.gguf" --outtype q8_0 --verify
printf '\n==== llama.cpp answers from the GGUF file: %s\n' "$QUESTION"
"$PYTHON" - "$WORK/gguf/full-q8_0.gguf" "$QUESTION" <<'PY'
import sys

from llama_cpp import Llama

llm = Llama(model_path=sys.argv[1], verbose=False)
reply = llm.create_chat_completion(
    messages=[{"role": "user", "content": sys.argv[2]}], max_tokens=48, temperature=0
)
print("llama.cpp:", reply["choices"][0]["message"]["content"])
llm.close()
PY
echo "(PyTorch, greedy: $("$PYTHON" cli_demo.py -c "$WORK/full" --query "$QUESTION" --max_new_tokens 48 --greedy 2>/dev/null))"

#!/usr/bin/env bash
# The after-training chain on a tiny random Qwen built on the fly, with the repository's own commands:
#   LoRA (finetune/finetune_lora_single_gpu.sh) -> merge_lora.py -> run_gptq.py (Int4)
#   -> Q-LoRA on the Int4 model (finetune/finetune_qlora_single_gpu.sh) -> cli_demo.py on each result.
# CPU is enough (a few minutes). The model is random, so the replies are gibberish: the point is
# that every step runs and every artifact loads. Usage: bash scripts/demo_chain.sh [WORK_DIR] [BASE_MODEL_DIR]
# With BASE_MODEL_DIR (e.g. the model scripts/demo.sh fine-tuned) the chain starts from it instead.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

export PYTHON="${PYTHON:-$REPO_ROOT/.venv/bin/python}"
export GPTQMODEL_CPU_WORKERS="${GPTQMODEL_CPU_WORKERS:-2}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
WORK="${1:-$(mktemp -d "${TMPDIR:-/tmp}/qwen-demo-chain.XXXXXX")}"
DATA="data/example.json"
QUERY="Who are you?"
# A random model needs large steps to move at all; a trained one small steps, or the LoRA and Q-LoRA runs
# undo what it learned (its answers are what the demo checks).
LEARNING_RATE=1e-2
[[ -z "${2:-}" ]] || LEARNING_RATE=2e-4
# Short CPU runs: a few steps in fp32 without DeepSpeed; drop these flags on a GPU with a real model.
QUICK=(--max_steps 8 --gradient_accumulation_steps 1 --model_max_length 256 --learning_rate "$LEARNING_RATE"
    --lr_scheduler_type constant --warmup_ratio 0 --save_strategy no --deepspeed none)

step() { printf '\n==== %s\n' "$*"; }

[[ -x "$PYTHON" ]] || { echo "no Python at $PYTHON: run bash scripts/setup.sh first (or set PYTHON)" >&2; exit 1; }
mkdir -p "$WORK"
echo "working directory: $WORK"

BASE="${2:-$WORK/tiny}"
if [[ -n "${2:-}" ]]; then
    step "1/6 starting from $BASE"
else
    step "1/6 a tiny random Qwen chat model"
    "$PYTHON" -m qwen_model.tiny --out "$BASE"
fi

step "2/6 LoRA fine-tuning"
bash finetune/finetune_lora_single_gpu.sh -m "$BASE" -d "$DATA" \
    --output_dir "$WORK/lora" --bf16 False "${QUICK[@]}"

step "3/6 merge the adapter into the base (checks the merged logits)"
"$PYTHON" merge_lora.py --adapter_dir "$WORK/lora" --output_dir "$WORK/merged"

step "4/6 GPTQ Int4 (group size 32: the tiny model's layers are only 64 and 128 wide)"
"$PYTHON" run_gptq.py --model_name_or_path "$WORK/merged" --data_path "$DATA" \
    --out_path "$WORK/int4" --bits 4 --group-size 32 --max_len 256

step "5/6 Q-LoRA on the Int4 model"
bash finetune/finetune_qlora_single_gpu.sh -m "$WORK/int4" -d "$DATA" \
    --output_dir "$WORK/qlora" --fp16 False "${QUICK[@]}"

step "6/6 chat with each result: cli_demo.py --query \"$QUERY\""
for target in "$WORK/merged" "$WORK/int4" "$WORK/int4 --adapter $WORK/qlora"; do
    # shellcheck disable=SC2086  # the adapter case is two arguments
    reply="$("$PYTHON" cli_demo.py -c $target --query "$QUERY" --max_new_tokens 16 2>"$WORK/chat.log")" \
        || { cat "$WORK/chat.log" >&2; exit 1; }
    printf '%-60s -> %s\n' "${target#"$WORK/"}" "$reply"
done

echo
echo "done: artifacts in $WORK (tiny, lora, merged, int4, qlora)"

#!/usr/bin/env bash
# Q-LoRA in one process on one GPU (or the CPU) with DeepSpeed ZeRO-2 but without a launcher:
# DeepSpeed discovers its rank through mpi4py (install the [mpi] extra: mpi4py + Debian libopenmpi-dev).
set -euo pipefail

SCRIPT_NAME="finetune_qlora_single_gpu.sh"
SCRIPT_PURPOSE="Q-LoRA fine-tuning in one process, DeepSpeed ZeRO-2 (rank via mpi4py): GPU 0, or the CPU."
DS_CONFIG_PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/ds_config_zero2.json"
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
parse_launch_args "$@"
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"

launch_single_process \
    --model_name_or_path "$MODEL" \
    --data_path "$DATA" \
    --fp16 True \
    --output_dir output_qwen \
    --num_train_epochs 5 \
    --per_device_train_batch_size 2 \
    --per_device_eval_batch_size 1 \
    --gradient_accumulation_steps 8 \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 1000 \
    --save_total_limit 10 \
    --learning_rate 3e-4 \
    --weight_decay 0.1 \
    --adam_beta2 0.95 \
    --warmup_ratio 0.01 \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --report_to "none" \
    --model_max_length 512 \
    --use_lora \
    --q_lora \
    --gradient_checkpointing \
    "${DS_ARGS[@]}" \
    "${EXTRA_ARGS[@]}"

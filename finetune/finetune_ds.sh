#!/usr/bin/env bash
# Full-parameter fine-tuning with DeepSpeed ZeRO-3 on every GPU of every node.
# Multinode: run it on each node with NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT set (docs/training.md).
set -euo pipefail

SCRIPT_NAME="finetune_ds.sh"
SCRIPT_PURPOSE="Full-parameter fine-tuning, DeepSpeed ZeRO-3, torchrun over all GPUs (1 CPU process without GPUs)."
DS_CONFIG_PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/ds_config_zero3.json"
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
parse_launch_args "$@"

launch_torchrun \
    --model_name_or_path "$MODEL" \
    --data_path "$DATA" \
    --bf16 True \
    --output_dir output_qwen \
    --num_train_epochs 3 \
    --per_device_train_batch_size 1 \
    --per_device_eval_batch_size 1 \
    --gradient_accumulation_steps 16 \
    --evaluation_strategy "no" \
    --save_strategy "steps" \
    --save_steps 1000 \
    --save_total_limit 10 \
    --learning_rate 1e-5 \
    --weight_decay 0.1 \
    --adam_beta2 0.95 \
    --warmup_ratio 0.01 \
    --lr_scheduler_type "cosine" \
    --logging_steps 1 \
    --report_to "none" \
    --model_max_length 512 \
    --gradient_checkpointing True \
    "${DS_ARGS[@]}" \
    "${EXTRA_ARGS[@]}"

#!/usr/bin/env bash
# Q-LoRA (LoRA on a GPTQ Int4/Int8 checkpoint) with DeepSpeed ZeRO-2 on every GPU of every node.
# For a full-precision checkpoint add --q_lora_backend nf4. fp16, not bf16, as the original (GPTQ kernels).
set -euo pipefail

SCRIPT_NAME="finetune_qlora_ds.sh"
SCRIPT_PURPOSE="Q-LoRA fine-tuning, DeepSpeed ZeRO-2, torchrun over all GPUs (1 CPU process without GPUs)."
DS_CONFIG_PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/ds_config_zero2.json"
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
parse_launch_args "$@"

launch_torchrun \
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

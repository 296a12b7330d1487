#!/usr/bin/env bash
# Q-LoRA on a GPTQ Int4/Int8 checkpoint (nf4: add --q_lora_backend nf4) under DeepSpeed ZeRO-2, on every GPU of every node.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
launch_recipe qlora.yaml torchrun ds_config_zero2.json "$@"

#!/usr/bin/env bash
# LoRA in one process on one GPU (or the CPU), without DeepSpeed unless --deepspeed names a config.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
launch_recipe lora.yaml single none "$@"

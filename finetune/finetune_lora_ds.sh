#!/usr/bin/env bash
# LoRA under DeepSpeed ZeRO-2, on every GPU of every node (multinode: docs/training.md).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
launch_recipe lora.yaml torchrun ds_config_zero2.json "$@"

#!/usr/bin/env bash
# Preference optimisation (DPO; --pref_loss for the others) with LoRA under DeepSpeed ZeRO-2, on every GPU of every node.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
launch_recipe dpo_lora.yaml torchrun ds_config_zero2.json "$@"

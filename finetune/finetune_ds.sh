#!/usr/bin/env bash
# Full-parameter fine-tuning under DeepSpeed ZeRO-3, on every GPU of every node (multinode: docs/training.md).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
launch_recipe full.yaml torchrun ds_config_zero3.json "$@"

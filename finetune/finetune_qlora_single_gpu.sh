#!/usr/bin/env bash
# Q-LoRA in one process on one GPU (or the CPU) under DeepSpeed ZeRO-2 without a launcher: DeepSpeed
# finds its rank through mpi4py (the [mpi] extra: mpi4py and Debian's libopenmpi-dev).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/launch_common.sh"
launch_recipe qlora.yaml single ds_config_zero2.json "$@"

# Shared by the finetune_*.sh launch scripts (sourced, not run): option parsing, device detection
# and the torchrun command line. See docs/training.md.
#
# Environment:
#   PYTHON          interpreter to run (default: `python` on PATH, i.e. the activated venv)
#   NNODES          number of nodes (default 1)
#   NODE_RANK       rank of this node, 0..NNODES-1 (default 0)
#   MASTER_ADDR     address of node 0 (default localhost)
#   MASTER_PORT     port on node 0 (default 6001)
#   NPROC_PER_NODE  processes per node (default: number of visible GPUs, or 1 without GPUs)

PYTHON="${PYTHON:-python}"
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FINETUNE_PY="$REPO_DIR/finetune.py"

MODEL=""
DATA=""
EXTRA_ARGS=()

usage() {
    cat <<EOF
Usage: bash finetune/$SCRIPT_NAME -m MODEL_DIR -d DATA_PATH [--deepspeed DS_CONFIG|none] [finetune.py flags...]

$SCRIPT_PURPOSE

  -m, --model DIR        checkpoint directory (Qwen v1 layout)
  -d, --data PATH        training data: .json/.jsonl file(s), comma-separated
      --deepspeed FILE   DeepSpeed config (default: $DS_CONFIG_PATH); 'none' disables DeepSpeed
  -h, --help             this message

Every other flag is passed to finetune.py and overrides the script's defaults
(e.g. --output_dir out --num_train_epochs 1 --bf16 False); see 'python finetune.py --help'.

Environment: PYTHON (default 'python'), NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT,
NPROC_PER_NODE (default: visible GPUs, 1 without GPUs).
EOF
}

parse_launch_args() {
    while [[ $# -gt 0 ]]; do
        case "$1" in
            -m | --model)
                [[ $# -ge 2 ]] || { echo "error: $1 needs a value" >&2; usage >&2; exit 2; }
                MODEL="$2"
                shift 2
                ;;
            -d | --data)
                [[ $# -ge 2 ]] || { echo "error: $1 needs a value" >&2; usage >&2; exit 2; }
                DATA="$2"
                shift 2
                ;;
            --deepspeed)
                [[ $# -ge 2 ]] || { echo "error: $1 needs a value" >&2; usage >&2; exit 2; }
                DS_CONFIG_PATH="$2"
                shift 2
                ;;
            -h | --help)
                usage
                exit 0
                ;;
            *)
                EXTRA_ARGS+=("$1")
                shift
                ;;
        esac
    done
    if [[ -z "$MODEL" || -z "$DATA" ]]; then
        echo "error: both -m/--model and -d/--data are required" >&2
        usage >&2
        exit 2
    fi
    set_deepspeed_args
}

# DS_ARGS: the --deepspeed flags for finetune.py (empty when DeepSpeed is disabled).
set_deepspeed_args() {
    DS_ARGS=()
    if [[ -n "$DS_CONFIG_PATH" && "$DS_CONFIG_PATH" != "none" ]]; then
        DS_ARGS=(--deepspeed "$DS_CONFIG_PATH")
    fi
}

count_gpus() {
    "$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)'
}

# Runs finetune.py under torchrun with the node layout from the environment.
launch_torchrun() {
    local gpus nproc
    gpus="$(count_gpus)"
    if [[ -n "${NPROC_PER_NODE:-}" ]]; then
        nproc="$NPROC_PER_NODE"
    elif [[ "$gpus" -gt 0 ]]; then
        nproc="$gpus"
    else
        nproc=1
        echo "[$SCRIPT_NAME] no GPU found: 1 CPU process per node (set NPROC_PER_NODE for more)" >&2
    fi
    local -a distributed=(
        --nproc_per_node "$nproc"
        --nnodes "${NNODES:-1}"
        --node_rank "${NODE_RANK:-0}"
        --master_addr "${MASTER_ADDR:-localhost}"
        --master_port "${MASTER_PORT:-6001}"
    )
    echo "[$SCRIPT_NAME] torchrun ${distributed[*]}" >&2
    exec "$PYTHON" -m torch.distributed.run "${distributed[@]}" "$FINETUNE_PY" "$@"
}

# Runs finetune.py in this one process (DeepSpeed, if used, finds its rank through mpi4py).
launch_single_process() {
    echo "[$SCRIPT_NAME] one process: $PYTHON finetune.py" >&2
    exec "$PYTHON" "$FINETUNE_PY" "$@"
}

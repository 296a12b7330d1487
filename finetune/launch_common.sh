# Sourced by the finetune_*.sh scripts, each of which only names a recipe (finetune/recipes/), a
# launcher and a DeepSpeed config: `launch_recipe RECIPE torchrun|single DS_CONFIG|none "$@"`.
# This file reads the options, finds the interpreter and starts finetune.py. See docs/training.md.
#
# Environment:
#   PYTHON          interpreter; default: the activated environment's python, else the repository's
#                   .venv, else python3 on PATH
#   NNODES          number of nodes (default 1)
#   NODE_RANK       rank of this node, 0..NNODES-1 (default 0)
#   MASTER_ADDR     address of node 0 (default localhost)
#   MASTER_PORT     port on node 0 (default 6001)
#   NPROC_PER_NODE  processes per node (default: number of visible GPUs, or 1 without GPUs)

FINETUNE_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_DIR="$(dirname "$FINETUNE_DIR")"
SCRIPT_NAME="$(basename "$0")"

launch_recipe() {
    local recipe="$FINETUNE_DIR/recipes/$1" launcher="$2" deepspeed="$3"
    shift 3
    [[ "$deepspeed" == none ]] || deepspeed="$FINETUNE_DIR/$deepspeed"
    local model="" data="" option
    local -a passed=()
    while (($# > 0)); do
        option="$1"
        case "$option" in
            -h | --help)
                describe "$recipe" "$launcher" "$deepspeed"
                exit 0
                ;;
            -m | --model | -d | --data | --deepspeed)
                (($# >= 2)) || usage_error "$option needs a value" "$recipe" "$launcher" "$deepspeed"
                case "$option" in
                    -m | --model) model="$2" ;;
                    -d | --data) data="$2" ;;
                    *) deepspeed="$2" ;;
                esac
                shift 2
                ;;
            *)
                passed+=("$option")
                shift
                ;;
        esac
    done
    [[ -n "$model" && -n "$data" ]] ||
        usage_error "both -m/--model and -d/--data are required" "$recipe" "$launcher" "$deepspeed"

    choose_python
    local -a flags=(--config "$recipe" --model_name_or_path "$model" --data_path "$data")
    [[ "$deepspeed" == none ]] || flags+=(--deepspeed "$deepspeed")
    flags+=("${passed[@]}")
    if [[ "$launcher" == torchrun ]]; then
        run_torchrun "${flags[@]}"
    else
        run_one_process "${flags[@]}"
    fi
}

describe() {
    local where="one process per GPU on every node (torchrun; one CPU process without GPUs)"
    [[ "$2" == torchrun ]] || where="one process on GPU 0 (CUDA_VISIBLE_DEVICES), or the CPU without GPUs"
    cat <<EOF
Usage: bash finetune/$SCRIPT_NAME -m MODEL_DIR -d DATA_PATH [--deepspeed FILE|none] [finetune.py flags...]

Runs finetune.py with the recipe ${1#"$REPO_DIR/"}, $where.

  -m, --model DIR        checkpoint directory (Qwen v1 layout)
  -d, --data PATH        training data: .json/.jsonl file(s), comma-separated
      --deepspeed FILE   DeepSpeed config (default: ${3#"$REPO_DIR/"}); 'none' runs without DeepSpeed
  -h, --help             this message

Any other flag goes to finetune.py and overrides the recipe (e.g. --output_dir run1
--num_train_epochs 1 --bf16 false); 'python finetune.py --help' lists them.

Environment: PYTHON (default: the activated environment, else .venv, else python3), NNODES,
NODE_RANK, MASTER_ADDR, MASTER_PORT, NPROC_PER_NODE (default: visible GPUs, 1 without GPUs).
EOF
}

usage_error() {
    echo "error: $1" >&2
    describe "$2" "$3" "$4" >&2
    exit 2
}

# PYTHON, unless set: the activated environment's, the repository's .venv, or python3 on PATH; it
# must be able to import torch and transformers, else one line says how to set up.
choose_python() {
    if [[ -z "${PYTHON:-}" ]]; then
        if [[ -n "${VIRTUAL_ENV:-}${CONDA_PREFIX:-}" ]]; then
            PYTHON=python
        elif [[ -x "$REPO_DIR/.venv/bin/python" ]]; then
            PYTHON="$REPO_DIR/.venv/bin/python"
        else
            PYTHON=python3
        fi
    fi
    local probe='import importlib.util as u, sys; sys.exit(not (u.find_spec("torch") and u.find_spec("transformers")))'
    if ! "$PYTHON" -c "$probe" 2>/dev/null; then
        echo "[$SCRIPT_NAME] error: '$PYTHON' has no torch/transformers: run 'bash scripts/setup.sh' (creates .venv, used automatically), activate your environment, or set PYTHON" >&2
        exit 1
    fi
}

run_torchrun() {
    local nproc="${NPROC_PER_NODE:-}"
    if [[ -z "$nproc" ]]; then
        nproc="$("$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)')"
        if [[ "$nproc" == 0 ]]; then
            nproc=1
            echo "[$SCRIPT_NAME] no GPU found: 1 CPU process per node (set NPROC_PER_NODE for more)" >&2
        fi
    fi
    # What torchrun itself would set for several processes, without its banner saying so.
    if [[ "$nproc" =~ ^[0-9]+$ ]] && ((nproc > 1)); then
        export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    fi
    local -a layout=(
        --nproc_per_node "$nproc"
        --nnodes "${NNODES:-1}"
        --node_rank "${NODE_RANK:-0}"
        --master_addr "${MASTER_ADDR:-localhost}"
        --master_port "${MASTER_PORT:-6001}"
    )
    echo "[$SCRIPT_NAME] torchrun ${layout[*]}" >&2
    exec "$PYTHON" -m torch.distributed.run "${layout[@]}" "$REPO_DIR/finetune.py" "$@"
}

# One process on GPU 0 unless CUDA_VISIBLE_DEVICES says otherwise; DeepSpeed, if used, finds its rank
# through mpi4py.
run_one_process() {
    export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
    echo "[$SCRIPT_NAME] one process: $PYTHON finetune.py" >&2
    exec "$PYTHON" "$REPO_DIR/finetune.py" "$@"
}

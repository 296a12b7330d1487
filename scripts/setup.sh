#!/usr/bin/env bash
# One idempotent set-up for a fresh machine (Python, pip, apt only): OpenMPI, the .venv with pinned
# packages, and the Qwen vocabulary. A second run finds everything current and returns in seconds.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

VENV="$REPO_ROOT/.venv"
PY="${PYTHON_BIN:-python3}"
STAMP="$VENV/.setup-stamp"
VOCAB="$REPO_ROOT/qwen_model/qwen.tiktoken"
VOCAB_SHA256="b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"
SHARED_DIR="${QWEN_SHARED_DIR:-$REPO_ROOT/../shared}"
DASHSCOPE_VERSION="1.24.6"

log() { printf '[setup] %s\n' "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

# What the environment is built from: a change to any of these means "install again".
wanted_stamp() { cat pyproject.toml constraints.txt scripts/setup.sh | sha256sum | cut -d' ' -f1; }

vocab_is_valid() { [[ -f "$VOCAB" ]] && [[ "$(sha256_of "$VOCAB")" == "$VOCAB_SHA256" ]]; }

install_system_packages() {
    # OpenMPI for mpi4py / mpirun (single-process DeepSpeed launches); Chromium to check that the run
    # report renders (tests). Both from Debian.
    local mpi=() browser=()
    command -v mpirun >/dev/null 2>&1 && command -v mpicc >/dev/null 2>&1 || mpi=(libopenmpi-dev openmpi-bin)
    command -v chromium >/dev/null 2>&1 || browser=(chromium)
    [[ ${#mpi[@]} -gt 0 || ${#browser[@]} -gt 0 ]] || return 0
    local sudo=""
    if [[ "$(id -u)" != "0" ]]; then
        command -v sudo >/dev/null 2>&1 || { log "not root and no sudo: cannot install ${mpi[*]} ${browser[*]}"; return; }
        sudo="sudo"
    fi
    log "installing Debian packages: ${mpi[*]} ${browser[*]}"
    $sudo apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${mpi[@]}" "${browser[@]}" >/dev/null
}

install_python_packages() {
    [[ -x "$VENV/bin/python" ]] || { log "creating $VENV"; "$PY" -m venv "$VENV"; }
    local pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
    if command -v nvidia-smi >/dev/null 2>&1; then
        log "NVIDIA driver found: torch==2.13.0 from PyPI (CUDA build)"
    else
        log "no GPU: torch==2.13.0 CPU build (pinned so that no CUDA build is pulled)"
    fi
    # llama-cpp-python (a test reference) compiles llama.cpp, the longest step of a fresh set-up (about
    # 4 minutes on 2 cores): its wheel builds in the background while torch and DeepSpeed install.
    local wheels="$VENV/built-wheels"
    mkdir -p "$wheels"
    log "building llama-cpp-python in the background (log: $wheels/build.log)"
    "${pip[@]}" wheel -c constraints.txt --no-deps -w "$wheels" llama-cpp-python >"$wheels/build.log" 2>&1 &
    local llama_build=$!
    trap 'kill '"$llama_build"' 2>/dev/null' EXIT  # a failed install below stops the build too
    "${pip[@]}" install -c constraints.txt torch==2.13.0
    # DeepSpeed's sdist imports torch while building: build it against the torch just installed.
    "${pip[@]}" install -c constraints.txt --no-build-isolation deepspeed
    wait "$llama_build" || { tail -n 40 "$wheels/build.log" >&2; die "building llama-cpp-python failed (above)"; }
    trap - EXIT
    log "installing qwen-finetune with all extras (pinned by constraints.txt)"
    "${pip[@]}" install -c constraints.txt --find-links "$wheels" -e ".[all]"
    rm -rf "$wheels"
    # gptqmodel declares torchao (used only for FP4 formats and Triton kernels) and maturin (a build tool);
    # neither is used here, and torchao prints "Failed to load ..." on every import without a GPU.
    "${pip[@]}" uninstall -y torchao maturin
}

fetch_vocab() {
    if vocab_is_valid; then
        return
    fi
    mkdir -p "$(dirname "$VOCAB")"
    if [[ -f "$SHARED_DIR/qwen.tiktoken" ]]; then
        log "vocabulary: copying $SHARED_DIR/qwen.tiktoken"
        cp "$SHARED_DIR/qwen.tiktoken" "$VOCAB.tmp"
    else
        log "vocabulary: extracting qwen.tiktoken from the dashscope wheel on PyPI"
        local tmp
        tmp="$(mktemp -d)"
        "$VENV/bin/python" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "dashscope==$DASHSCOPE_VERSION" \
            || die "could not download the dashscope wheel; copy qwen.tiktoken to $VOCAB by hand"
        "$VENV/bin/python" - "$tmp" "$VOCAB.tmp" <<'PYEOF'
import sys, zipfile, pathlib
wheel = next(pathlib.Path(sys.argv[1]).glob("dashscope-*.whl"))
with zipfile.ZipFile(wheel) as archive:
    pathlib.Path(sys.argv[2]).write_bytes(archive.read("dashscope/resources/qwen.tiktoken"))
PYEOF
        rm -rf "$tmp"
    fi
    [[ "$(sha256_of "$VOCAB.tmp")" == "$VOCAB_SHA256" ]] || { rm -f "$VOCAB.tmp"; die "qwen.tiktoken has the wrong sha256 (expected $VOCAB_SHA256)"; }
    mv "$VOCAB.tmp" "$VOCAB"
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$(wanted_stamp)" ]] && vocab_is_valid; then
    log "environment is current ($VENV)"
    exit 0
fi

install_system_packages
install_python_packages
fetch_vocab
wanted_stamp >"$STAMP"
log "done: $VENV is ready"

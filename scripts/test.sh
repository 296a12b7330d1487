#!/usr/bin/env bash
# The test command: set-up (idempotent), lint, type check, then the whole pytest suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`).
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

bash scripts/setup.sh

# Compiled DeepSpeed ops are cached beside the venv, so a second run does not rebuild them.
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$REPO_ROOT/.venv/torch_extensions}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

echo "[test] ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .

echo "[test] mypy (qwen_model, qwen_finetune)"
.venv/bin/mypy

# Two pytest workers by default: a test keeps about one core busy on average (imports, data preparation,
# small matmuls), so two of them fill a 2-core machine. Each test file stays on one worker, so the
# module-scoped runs a file shares are trained once. QWEN_TEST_WORKERS=0 runs everything in this process.
WORKERS="${QWEN_TEST_WORKERS:-2}"
echo "[test] pytest ($WORKERS workers)"
set +e
.venv/bin/python -m pytest -n "$WORKERS" --dist loadfile "$@"
status=$?
set -e
if [[ $status -eq 5 ]]; then
    echo "[test] ERROR: pytest collected no tests" >&2
    exit 1
fi
exit $status

"""Shared pytest fixtures: where ../shared lives, the vocabulary, and tiny checkpoints built once per session."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _shared_dir() -> Path:
    return Path(os.environ.get("QWEN_SHARED_DIR", REPO_ROOT.parent / "shared")).resolve()


@pytest.fixture(scope="module", autouse=True)
def _environment_per_module():
    """Each test module starts from the environment the session started with: libraries that train in
    this process set variables (accelerate sets ACCELERATE_USE_FSDP=true once it has seen an FSDP
    plugin), and every command a later test starts would inherit them."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared (real data, vocabulary). In CI its absence is a failure, elsewhere a visible skip."""
    path = _shared_dir()
    if not (path / "data").is_dir():
        message = f"shared data directory not found at {path} (set QWEN_SHARED_DIR to point at it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def shared_data_dir(shared_dir: Path) -> Path:
    return shared_dir / "data"


@pytest.fixture(scope="session")
def vocab_file() -> Path:
    from qwen_model.tiny import default_vocab_file

    return Path(default_vocab_file())


@pytest.fixture(scope="session")
def tokenizer(vocab_file: Path) -> Any:
    """The Qwen tokenizer on the real vocabulary (no checkpoint needed)."""
    from qwen_model.tokenization_qwen import QWenTokenizer

    return QWenTokenizer(vocab_file=str(vocab_file))


@pytest.fixture(scope="session")
def tiny_chat_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init tiny Qwen chat checkpoint in the official layout (built once per session)."""
    from qwen_model.tiny import build_tiny_checkpoint

    return Path(build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-chat"), size="tiny", base=False))


@pytest.fixture(scope="session")
def tiny_base_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base-model variant: no ChatML knowledge, for trainable-embedding logic."""
    from qwen_model.tiny import build_tiny_checkpoint

    return Path(build_tiny_checkpoint(tmp_path_factory.mktemp("tiny-base"), size="tiny", base=True))


@pytest.fixture(scope="session")
def checkpoints(tiny_chat_checkpoint: Path, tiny_base_checkpoint: Path) -> dict[str, Path]:
    """The tiny chat and base checkpoints by the names the training tests parametrize over."""
    return {"chat": tiny_chat_checkpoint, "base": tiny_base_checkpoint}

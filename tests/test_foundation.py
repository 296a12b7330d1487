"""The project's own contract: set-up is idempotent and the test command fails honestly."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, **kwargs)


def test_setup_second_run_installs_nothing() -> None:
    first = _run(["bash", "scripts/setup.sh"])
    assert first.returncode == 0, first.stderr
    second = _run(["bash", "scripts/setup.sh"])
    assert second.returncode == 0, second.stderr
    assert "environment is current" in second.stdout
    assert "installing" not in second.stdout


def test_vocabulary_in_place_with_the_official_hash() -> None:
    import hashlib

    vocab = REPO_ROOT / "qwen_model" / "qwen.tiktoken"
    digest = hashlib.sha256(vocab.read_bytes()).hexdigest()
    assert digest == "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"


@pytest.mark.parametrize(
    ("test_body", "pytest_args", "expected_message"),
    [
        ("def test_fails():\n    assert 1 == 2\n", [], "1 failed"),
        ("def test_passes():\n    pass\n", ["-k", "no_such_test_name"], "collected no tests"),
    ],
    ids=["failing-test", "no-test-collected"],
)
def test_test_command_exits_non_zero(
    tmp_path: Path, test_body: str, pytest_args: list[str], expected_message: str
) -> None:
    test_file = tmp_path / "test_probe.py"
    test_file.write_text(test_body)
    result = _run(["bash", "scripts/test.sh", str(test_file), "-p", "no:cacheprovider", *pytest_args])
    assert result.returncode != 0
    assert expected_message in result.stdout + result.stderr

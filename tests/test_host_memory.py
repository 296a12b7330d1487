"""--keep_freed_memory: which runs keep freed memory, and that glibc then reuses it without page faults."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest
import train_helpers as helpers

from qwen_finetune import train as train_module
from qwen_finetune.args import parse_run_arguments
from qwen_finetune.errors import ArgumentError
from qwen_finetune.host_memory import ALLOCATOR_VARIABLES, glibc_available, keeps_freed_memory

REPO = Path(__file__).resolve().parents[1]
needs_glibc = pytest.mark.skipif(not glibc_available(), reason="mallopt is glibc's")

# Frees a 64 MiB tensor (above glibc's largest mmap threshold, 32 MiB), then allocates and frees four
# smaller ones that fit in its place, and prints the minor page faults those four took. (Tensors of the
# very same size are no test: torch's aligned allocations ask for a little more than a freed one holds.)
_REUSE_SCRIPT = """
import resource, sys, torch
from qwen_finetune.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
mib = 2**20 // 4
torch.ones(64 * mib)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for size in SIZES_MIB:
    tensor = torch.ones(size * mib)
    del tensor
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
SIZES_MIB = (60, 56, 52, 48)
PAGES_OF_THE_FOUR = sum(SIZES_MIB) * 2**20 // 4096


def page_faults_of_four_tensors(mode: str) -> int:
    script = _REUSE_SCRIPT.replace("SIZES_MIB", repr(SIZES_MIB))
    completed = subprocess.run(
        [sys.executable, "-c", script, mode], capture_output=True, text=True, cwd=REPO, check=True
    )
    return int(completed.stdout.strip().splitlines()[-1])


@needs_glibc
def test_kept_memory_is_reused_without_page_faults() -> None:
    # glibc's default maps each of them afresh: every page is faulted in
    assert page_faults_of_four_tensors("default") >= PAGES_OF_THE_FOUR
    # kept: they take the pages of the freed 64 MiB
    assert page_faults_of_four_tensors("keep") < PAGES_OF_THE_FOUR // 20


@pytest.fixture(autouse=True)
def no_allocator_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*ALLOCATOR_VARIABLES, "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)


def test_auto_keeps_freed_memory_on_cpu_runs_only() -> None:
    assert keeps_freed_memory("auto", trains_on_cpu=True) == glibc_available()
    assert not keeps_freed_memory("auto", trains_on_cpu=False)
    assert not keeps_freed_memory("no", trains_on_cpu=True)


@needs_glibc
def test_yes_keeps_freed_memory_on_gpu_runs_too() -> None:
    assert keeps_freed_memory("yes", trains_on_cpu=False)


@pytest.mark.parametrize(
    ("name", "value"),
    [("MALLOC_MMAP_THRESHOLD_", "1048576"), ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")],
)
def test_auto_leaves_an_allocator_the_environment_set_up(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    assert not keeps_freed_memory("auto", trains_on_cpu=True)
    assert keeps_freed_memory("yes", trains_on_cpu=True) == glibc_available()


def test_yes_without_glibc_is_refused_and_auto_leaves_the_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    with pytest.raises(
        ArgumentError, match="--keep_freed_memory yes needs glibc.*use --keep_freed_memory auto"
    ):
        keeps_freed_memory("yes", trains_on_cpu=True)
    assert not keeps_freed_memory("auto", trains_on_cpu=True)


def test_the_flag_is_parsed_and_checked_before_anything_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def flags(value: str) -> list[str]:
        return [
            *("--model_name_or_path", str(tmp_path), "--data_path", "d.json"),
            *("--output_dir", str(tmp_path / "out"), "--use_cpu", "--keep_freed_memory", value),
        ]

    assert not parse_run_arguments(flags("no")).training.keeps_freed_memory
    assert parse_run_arguments(flags("auto")).training.keeps_freed_memory == glibc_available()
    with pytest.raises(ArgumentError, match="invalid choice: 'always'"):
        parse_run_arguments(flags("always"))
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))
    with pytest.raises(ArgumentError, match="needs glibc"):
        parse_run_arguments(flags("yes"))


class _WeightsWouldLoadHere(Exception):
    pass


@pytest.mark.parametrize("choice", ["auto", "no"])
def test_training_keeps_freed_memory_before_the_weights_load(
    choice: str, tiny_chat_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[str] = []

    def load_model(*args: object, **kwargs: object) -> None:
        events.append("load_model")
        raise _WeightsWouldLoadHere

    monkeypatch.setattr(train_module, "keep_freed_memory", lambda: events.append("keep_freed_memory"))
    monkeypatch.setattr(train_module, "load_model", load_model)
    flags = helpers.training_flags(
        tiny_chat_checkpoint,
        helpers.write_memorisable_data(tmp_path / "facts.json"),
        tmp_path / "out",
        steps=1,
        learning_rate=1e-3,
        cache_dir=tmp_path / "cache",
        extra=["--use_lora", "--keep_freed_memory", choice],
    )
    with pytest.raises(_WeightsWouldLoadHere):
        train_module.train(parse_run_arguments(flags))
    kept = choice == "auto" and glibc_available()
    assert events == (["keep_freed_memory", "load_model"] if kept else ["load_model"])

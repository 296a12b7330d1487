"""The toolkit's commands put PyTorch's large CPU tensors on transparent huge pages (host_memory.py).

Each check runs a command's entry (`run_command`) in a subprocess on a probe module that allocates a
256 MB tensor when it is imported, as a command's module imports torch, and reads the process's
AnonHugePages from the kernel: that the variable reached torch in time, not only the environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import train_helpers as helpers

from qwen_finetune import host_memory

THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
PROBE = """
import json, os, sys
torch_was_imported = "torch" in sys.modules
import torch
tensor = torch.ones(64 << 20)
rollup = open("/proc/self/smaps_rollup").read().splitlines()
huge_kb = next(int(line.split()[1]) for line in rollup if line.startswith("AnonHugePages:"))
print(json.dumps({"torch_was_imported": torch_was_imported,
                  "variable": os.environ.get("THP_MEM_ALLOC_ENABLE"), "huge_kb": huge_kb}))
def main(argv):
    return 0
"""


def thp_mode() -> str | None:
    """The kernel's transparent huge page mode (always, madvise, never), None where it has none."""
    if not THP_MODE_FILE.exists():
        return None
    text = THP_MODE_FILE.read_text()
    return text[text.index("[") + 1 : text.index("]")]


def run_probe(tmp_path: Path, **environment: str) -> dict[str, object]:
    (tmp_path / "probe_command.py").write_text(PROBE)
    env = {key: value for key, value in os.environ.items() if key != "THP_MEM_ALLOC_ENABLE"}
    env.update(PYTHONPATH=os.pathsep.join([str(tmp_path), str(helpers.REPO_ROOT)]), **environment)
    script = "import sys; from qwen_finetune.console import run_command; sys.exit(run_command('probe_command', []))"
    completed = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_use_huge_pages_sets_the_variable_and_keeps_the_users(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    host_memory.use_huge_pages()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "1"
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "0")
    host_memory.use_huge_pages()
    assert os.environ["THP_MEM_ALLOC_ENABLE"] == "0"


@pytest.mark.skipif(thp_mode() in (None, "never"), reason="this kernel has no transparent huge pages")
def test_a_command_allocates_large_tensors_on_huge_pages(tmp_path: Path) -> None:
    probe = run_probe(tmp_path)
    assert probe["torch_was_imported"] is False  # the variable is set before torch's first allocation
    assert probe["variable"] == "1"
    assert int(str(probe["huge_kb"])) >= 128 * 1024  # at least half of the 256 MB tensor


@pytest.mark.skipif(thp_mode() != "madvise", reason="only in madvise mode do pages depend on the request")
def test_the_user_can_keep_small_pages(tmp_path: Path) -> None:
    probe = run_probe(tmp_path, THP_MEM_ALLOC_ENABLE="0")
    assert probe["variable"] == "0"
    assert probe["huge_kb"] == 0

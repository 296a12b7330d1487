"""Let a CPU training process reuse the memory of the tensors it frees instead of faulting it in again.

glibc serves an allocation above its mmap threshold (which it raises as mapped blocks are freed, to at
most 32 MiB) with a fresh mapping and unmaps it on free. The next tensor of that size then starts on
untouched pages, and the kernel zero-fills every 4 KiB page when it is first written. A training step
allocates and frees tensors of the same sizes block after block, forward, recomputation and backward:
on the Qwen-1.8B shape at 2048 tokens the MLP's [2048 x 5504] float32 activations and their gradients
are 45 MB each, and a LoRA run took 13-15 million page faults in three micro-batches (bench/README.md).
With mappings switched off (M_MMAP_MAX 0) and the top of the heap kept (M_TRIM_THRESHOLD at its
largest), every tensor comes from glibc's heap and takes the pages an earlier one freed. The price: the
process keeps its peak memory until it exits, and the holes between live tensors stay resident.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
from typing import Literal

from qwen_finetune.errors import ArgumentError

logger = logging.getLogger(__name__)

KeepFreedMemory = Literal["auto", "yes", "no"]
# mallopt(3) parameters, from glibc's malloc.h
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
# mallopt takes an int: the heap's top is given back only once more than 2 GiB of it is free
LARGEST_TRIM_THRESHOLD = 2**31 - 1
# glibc reads these when the process starts; a user who set one chose the allocator's behaviour already
ALLOCATOR_VARIABLES = (
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_MMAP_MAX_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_TOP_PAD_",
)


def glibc_available() -> bool:
    """mallopt with glibc's parameters exists only in glibc (not musl, not macOS)."""
    return platform.libc_ver()[0] == "glibc"


def allocator_set_by_environment() -> bool:
    """Whether this process was started with glibc malloc settings (MALLOC_*_ variables, GLIBC_TUNABLES)."""
    return any(name in os.environ for name in ALLOCATOR_VARIABLES) or (
        "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
    )


def keeps_freed_memory(choice: KeepFreedMemory, trains_on_cpu: bool) -> bool:
    """Whether this run should keep freed memory: `auto` does on CPU runs (on a GPU the host holds
    little more than the loaded checkpoint, which should be given back) unless the environment already
    sets glibc's allocator, `yes` always, `no` never. `yes` without glibc is refused: the setting would
    not exist."""
    if choice == "yes" and not glibc_available():
        library = platform.libc_ver()[0] or "a C library other than glibc"
        raise ArgumentError(
            f"--keep_freed_memory yes needs glibc's allocator, and this Python runs on {library}; "
            "use --keep_freed_memory auto (which then leaves the allocator as it is) or no"
        )
    if choice == "auto":
        return trains_on_cpu and glibc_available() and not allocator_set_by_environment()
    return choice == "yes"


def keep_freed_memory() -> None:
    """Switch glibc's mappings off and keep the heap's top for the rest of this process."""
    libc = ctypes.CDLL(None)  # the process's own symbols: glibc is loaded in every CPython on it
    for parameter, value in ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, LARGEST_TRIM_THRESHOLD)):
        if libc.mallopt(parameter, value) != 1:
            raise RuntimeError(f"glibc's mallopt({parameter}, {value}) failed")
    logger.info("glibc keeps freed memory for reuse (--keep_freed_memory): no page faults on reuse")

"""Huge pages for the training process's large CPU tensors.

PyTorch's CPU allocator asks the kernel for transparent huge pages (2 MB) for every tensor of 2 MB or
more when THP_MEM_ALLOC_ENABLE=1 is in the environment at its first allocation. A CPU training step
allocates and frees tensors of that size all the time (the 156 MB logits chunk of the loss, activations,
gradients), and with 4 KB pages each one costs a page fault per 4 KB on first touch and more TLB misses
in the matmuls; bench/README.md has the measured difference. The kernel decides, so a machine with
transparent huge pages switched off ("never" in /sys/kernel/mm/transparent_hugepage/enabled) runs as
before. Numbers are unchanged: only where the bytes live differs.
"""

from __future__ import annotations

import os

# What the toolkit's processes run with, here and in the processes they start (torchrun workers).
HOST_MEMORY_ENVIRONMENT = {"THP_MEM_ALLOC_ENABLE": "1"}


def use_huge_pages() -> None:
    """Put HOST_MEMORY_ENVIRONMENT in the environment before torch is imported; a value the user set
    (THP_MEM_ALLOC_ENABLE=0 to keep 4 KB pages) wins."""
    for name, value in HOST_MEMORY_ENVIRONMENT.items():
        os.environ.setdefault(name, value)

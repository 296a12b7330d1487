"""Where the exported tensors come from: a checkpoint's safetensors files, or a model in memory.

A full-precision checkpoint is read one tensor at a time straight from its files, so exporting a
large model needs little more memory than its largest tensor. An adapter is merged into its base in
memory first (PEFT's merge_and_unload, in float32); nothing is written next to either.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from qwen_finetune.checkpoint_info import Checkpoint


@dataclass(frozen=True)
class SourceTensor:
    """One tensor under its checkpoint name; `load` reads or converts it only when it is written."""

    name: str
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]


def _write_order(name: str) -> tuple[int, int, str]:
    """Embeddings, then the blocks in order, then the final norm and the output layer."""
    block = re.match(r"transformer\.h\.(\d+)\.", name)
    if block is not None:
        return (1, int(block.group(1)), name)
    return (0 if name.startswith("transformer.wte") else 2, 0, name)


@contextlib.contextmanager
def checkpoint_tensors(checkpoint: Checkpoint) -> Iterator[list[SourceTensor]]:
    """The tensors of a safetensors checkpoint, each read from its file when loaded."""
    from safetensors import safe_open

    with contextlib.ExitStack() as stack:
        handles = {
            path: stack.enter_context(safe_open(str(path), framework="pt"))
            for path in sorted(set(checkpoint.tensor_files.values()))
        }
        yield [
            SourceTensor(
                name,
                tuple(handles[path].get_slice(name).get_shape()),
                functools.partial(handles[path].get_tensor, name),
            )
            for name, path in sorted(checkpoint.tensor_files.items(), key=lambda item: _write_order(item[0]))
        ]


def model_tensors(model: torch.nn.Module) -> list[SourceTensor]:
    """The tensors of a model in memory (a merged adapter, or a checkpoint stored as .bin)."""
    state = model.state_dict()
    return [
        SourceTensor(name, tuple(state[name].shape), functools.partial(state.__getitem__, name))
        for name in sorted(state, key=_write_order)
    ]


def load_model(model_dir: Path, adapter_dir: Path | None) -> torch.nn.Module:
    """The checkpoint in float32, with the adapter merged into it when one is given."""
    from transformers import AutoModelForCausalLM

    import qwen_model  # noqa: F401  (registers the Qwen classes with the Auto factories)

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return model.eval()

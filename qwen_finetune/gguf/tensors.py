"""Tensor names, layout and storage types of llama.cpp's `qwen` architecture.

Checked against llama.cpp's graph for it: RMSNorm, one fused q/k/v projection with bias whose
output holds all query heads, then all key heads, then all value heads (our `c_attn` layout);
NeoX-style RoPE on the first `n_rot` channels of each head (our `rotate_half`); no bias on the
attention output or the MLP; and the MLP `ffn_down(ffn_up(x) * silu(ffn_gate(x)))`. Ours is
`c_proj(w1(x) * silu(w2(x)))`, so `w1` is the up projection and `w2` the gate.

The layout needs no transposition: a torch `Linear` weight is [out, in], which GGUF (dimensions
listed fastest first) reads as llama.cpp's {in, out}.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from qwen_finetune.errors import ToolkitError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from gguf import MODEL_TENSOR, GGMLQuantizationType, LlamaFileType

logger = logging.getLogger(__name__)

OutType = Literal["f32", "f16", "bf16", "q8_0"]
OUT_TYPES: tuple[OutType, ...] = get_args(OutType)

_BLOCK_TENSOR = re.compile(r"transformer\.h\.(\d+)\.(.+)\.(weight|bias)")


class UnsupportedCheckpointError(ToolkitError):
    """The checkpoint holds something llama.cpp's `qwen` architecture cannot represent."""


def _tensor_kinds() -> tuple[dict[str, MODEL_TENSOR], dict[str, MODEL_TENSOR]]:
    """Our module names -> llama.cpp tensor kinds: (whole-model tensors, per-block tensors)."""
    from gguf import MODEL_TENSOR

    model = {
        "transformer.wte": MODEL_TENSOR.TOKEN_EMBD,
        "transformer.ln_f": MODEL_TENSOR.OUTPUT_NORM,
        "lm_head": MODEL_TENSOR.OUTPUT,
    }
    block = {
        "ln_1": MODEL_TENSOR.ATTN_NORM,
        "attn.c_attn": MODEL_TENSOR.ATTN_QKV,
        "attn.c_proj": MODEL_TENSOR.ATTN_OUT,
        "ln_2": MODEL_TENSOR.FFN_NORM,
        "mlp.w1": MODEL_TENSOR.FFN_UP,
        "mlp.w2": MODEL_TENSOR.FFN_GATE,
        "mlp.c_proj": MODEL_TENSOR.FFN_DOWN,
    }
    return model, block


def gguf_tensor_name(name: str) -> str:
    """llama.cpp's name for one of our checkpoint tensors, e.g. `blk.0.ffn_up.weight`."""
    from gguf import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES

    model, block = _tensor_kinds()
    module, _, suffix = name.rpartition(".")
    kind, block_index = model.get(module), None
    matched = _BLOCK_TENSOR.fullmatch(name)
    if matched is not None:
        kind, block_index = block.get(matched.group(2)), int(matched.group(1))
    if kind is None or suffix not in ("weight", "bias") or kind not in MODEL_TENSORS[MODEL_ARCH.QWEN]:
        raise UnsupportedCheckpointError(
            f"the checkpoint has a tensor {name!r} that llama.cpp's qwen architecture has no place for; "
            "only the tensors of a plain Qwen (v1) model can be exported"
        )
    return f"{TENSOR_NAMES[kind].format(bid=block_index)}.{suffix}"


def check_architecture(config: Any) -> None:
    """Refuse configurations llama.cpp's `qwen` graph would compute differently."""
    problems = []
    if config.num_attention_heads * config.kv_channels != config.hidden_size:
        problems.append(
            f"num_attention_heads * kv_channels ({config.num_attention_heads} * {config.kv_channels}) differs "
            f"from hidden_size ({config.hidden_size}); llama.cpp's qwen graph needs them equal"
        )
    if not config.no_bias:
        problems.append("no_bias is false; llama.cpp's qwen graph has no bias on c_proj, w1 and w2")
    if config.tie_word_embeddings:
        problems.append("tie_word_embeddings is true; llama.cpp's qwen graph needs a separate lm_head")
    if problems:
        raise UnsupportedCheckpointError(
            "this checkpoint cannot be exported to llama.cpp's qwen architecture: " + "; ".join(problems)
        )


@dataclass(frozen=True)
class StorageType:
    """How `--outtype` stores the 2-D weight matrices, and the file type GGUF records for it."""

    matrices: GGMLQuantizationType
    file_type: LlamaFileType


def storage_type(outtype: OutType) -> StorageType:
    from gguf import GGMLQuantizationType, LlamaFileType

    return {
        "f32": StorageType(GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
        "f16": StorageType(GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
        "bf16": StorageType(GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
        "q8_0": StorageType(GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
    }[outtype]


def tensor_type(name: str, shape: tuple[int, ...], outtype: OutType) -> GGMLQuantizationType:
    """The type one tensor is stored in: norms and biases (1-D) in float32, as llama.cpp expects;
    matrices in the `--outtype`, or float16 for q8_0 when a row does not split into 32-value blocks."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if len(shape) == 1:
        return GGMLQuantizationType.F32
    wanted = storage_type(outtype).matrices
    block_size = GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block_size:
        logger.info(
            "%s: rows of %d values do not split into %s blocks of %d; stored as f16",
            name,
            shape[-1],
            wanted.name,
            block_size,
        )
        return GGMLQuantizationType.F16
    return wanted


def stored_byte_shape(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> tuple[int, ...]:
    """The tensor's shape in bytes once stored in `qtype` (the last dimension holds whole blocks)."""
    from gguf import quant_shape_to_byte_shape

    return quant_shape_to_byte_shape(shape, qtype)


def encode_tensor(tensor: torch.Tensor, qtype: GGMLQuantizationType) -> np.ndarray:
    """The tensor's bytes as GGUF stores them in `qtype` (converted through float32)."""
    from gguf import quants

    return quants.quantize(tensor.detach().float().cpu().numpy(), qtype)

"""Configuration of the Qwen (v1) architecture.

Field names and defaults are those of the released Qwen checkpoints' ``config.json`` so that a
checkpoint directory loads unchanged. Fields this file does not know are kept as attributes (and
written back on save), like every transformers config.
"""

from typing import Any

import torch
from transformers import PreTrainedConfig

# The original switches for the dtype a checkpoint is stored and loaded in (config.json "bf16": true, ...).
PRECISION_FLAG_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class QWenConfig(PreTrainedConfig):
    """Hyper-parameters of a Qwen (v1) model.

    Notes on fields whose meaning is not obvious from their name:

    - ``kv_channels`` is the head dimension; attention width is ``num_attention_heads * kv_channels``.
    - ``intermediate_size`` is twice the MLP width: the MLP projections have ``intermediate_size // 2``
      rows (as in the released checkpoints).
    - ``seq_length`` is the training context. Past it, at inference only, ``use_dynamic_ntk`` stretches the
      rotary base and ``use_logn_attn`` scales queries by ``log_{seq_length}(position)``.
    - ``bf16`` / ``fp16`` / ``fp32``: the original switches for the load dtype; ``from_pretrained`` honours
      them when no ``dtype`` is given.
    - ``use_flash_attn`` is kept for compatibility; the attention kernel is chosen with transformers'
      ``attn_implementation`` ("sdpa" by default, "eager", or "flash_attention_2" when installed).
    - ``scale_attn_weights`` and ``softmax_in_fp32`` are kept for compatibility: scores are always scaled by
      ``1/sqrt(kv_channels)`` (as the original does whatever the flag says) and the eager softmax always
      runs in float32.
    - ``use_cache_quantization`` / ``use_cache_kernel`` (int8 KV cache) are not supported; building a model
      with either set raises an error that says how to turn them off.
    """

    model_type = "qwen"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 151936
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    kv_channels: int = 128
    intermediate_size: int = 22016
    emb_dropout_prob: float = 0.0
    attn_dropout_prob: float = 0.0
    layer_norm_epsilon: float = 1e-6
    initializer_range: float = 0.02
    seq_length: int = 8192
    max_position_embeddings: int = 8192
    rotary_pct: float | int = 1.0
    rotary_emb_base: float | int = 10000
    use_dynamic_ntk: bool = True
    use_logn_attn: bool = True
    use_flash_attn: bool | str = "auto"
    scale_attn_weights: bool = True
    softmax_in_fp32: bool = False
    no_bias: bool = True
    tie_word_embeddings: bool = False
    use_cache: bool = True
    bf16: bool = False
    fp16: bool = False
    fp32: bool = False
    use_cache_quantization: bool = False
    use_cache_kernel: bool = False

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        self.validate_architecture()

    @property
    def rotary_dim(self) -> int:
        """Number of leading channels of each head that RoPE rotates (the rest pass through)."""
        return int(self.kv_channels * self.rotary_pct)

    def validate_architecture(self) -> None:
        """Reject shapes the architecture cannot build, naming the fields to fix."""
        if self.rotary_dim <= 0 or self.rotary_dim % 2 or self.rotary_dim > self.kv_channels:
            raise ValueError(
                f"QWenConfig: int(kv_channels * rotary_pct) = int({self.kv_channels} * {self.rotary_pct}) = "
                f"{self.rotary_dim} must be a positive even number no larger than kv_channels; fix kv_channels "
                "or rotary_pct."
            )


__all__ = ["QWenConfig"]

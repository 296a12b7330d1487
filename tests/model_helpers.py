"""The small Qwen configurations the unit tests build in memory (no checkpoint on disk).

Heads are 16 wide, as kv_channels in the released models is a multiple of 16; hidden and MLP widths and
the vocabulary are chosen by each test for its speed.
"""

from __future__ import annotations

from qwen_model import QWenConfig

HEAD_WIDTH = 16


def micro_config(
    vocab: int, hidden: int = 32, intermediate: int = 96, layers: int = 2, positions: int = 64
) -> QWenConfig:
    return QWenConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // HEAD_WIDTH,
        kv_channels=HEAD_WIDTH,
        intermediate_size=intermediate,
        seq_length=positions,
        max_position_embeddings=positions,
    )

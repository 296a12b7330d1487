"""Parameter counts of a Qwen (v1) model and of a LoRA adapter on it, from config.json alone.

The layout is the released checkpoints' (see qwen_model/modeling_qwen.py): per block two RMSNorm
weights, the fused `attn.c_attn` (with a bias), `attn.c_proj`, and the MLP's `w1`, `w2` and
`c_proj` (width intermediate_size // 2); then `ln_f`, and untied `wte` / `lm_head`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Linear:
    inputs: int
    outputs: int
    bias: bool

    @property
    def weights(self) -> int:
        return self.inputs * self.outputs

    @property
    def parameters(self) -> int:
        return self.weights + (self.outputs if self.bias else 0)


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    heads: int
    head_dim: int
    mlp_width: int  # intermediate_size // 2
    vocab: int
    rotary_dim: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """From a config.json dict (the released field names)."""
        head_dim = int(config.get("kv_channels", 128))
        return cls(
            hidden=int(config["hidden_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=int(config["num_attention_heads"]),
            head_dim=head_dim,
            mlp_width=int(config["intermediate_size"]) // 2,
            vocab=int(config["vocab_size"]),
            rotary_dim=int(head_dim * float(config.get("rotary_pct", 1.0))),
        )

    @property
    def attention_width(self) -> int:
        return self.heads * self.head_dim

    def block_linears(self) -> dict[str, Linear]:
        """The linear layers of one block by their module path inside the block."""
        h, d, m = self.hidden, self.attention_width, self.mlp_width
        return {
            "attn.c_attn": Linear(h, 3 * d, bias=True),
            "attn.c_proj": Linear(d, h, bias=False),
            "mlp.w1": Linear(h, m, bias=False),
            "mlp.w2": Linear(h, m, bias=False),
            "mlp.c_proj": Linear(m, h, bias=False),
        }

    @property
    def block_linear_weights(self) -> int:
        """Matrix weights of all blocks (what GPTQ and NF4 quantize)."""
        return self.layers * sum(linear.weights for linear in self.block_linears().values())

    @property
    def block_parameters(self) -> int:
        """Everything inside the blocks: linear weights and biases, and the two norms of each block."""
        per_block = sum(linear.parameters for linear in self.block_linears().values()) + 2 * self.hidden
        return self.layers * per_block

    @property
    def embedding_parameters(self) -> int:
        """One of the two vocabulary matrices (wte or lm_head)."""
        return self.vocab * self.hidden

    @property
    def total_parameters(self) -> int:
        return self.block_parameters + 2 * self.embedding_parameters + self.hidden  # + ln_f

    @property
    def unquantized_parameters(self) -> int:
        """What stays in floating point on a GPTQ or NF4 base: embeddings, lm_head, norms, biases."""
        return self.total_parameters - self.block_linear_weights


def matches_target(module_path: str, target: str) -> bool:
    """PEFT's rule for a target given by name: the whole path, or its last components."""
    return module_path == target or module_path.endswith("." + target)


def lora_targets(shape: ModelShape, targets: Sequence[str]) -> dict[str, Linear]:
    """The block linears an adapter with these `--lora_target_modules` wraps (per block)."""
    return {
        path: linear
        for path, linear in shape.block_linears().items()
        if any(matches_target(path, target) for target in targets)
    }


@dataclass(frozen=True)
class AdapterShape:
    """What a LoRA adapter adds to every block, as PEFT builds it."""

    rank: int
    targets: tuple[str, ...]
    bias: str = "none"  # "none" | "all" | "lora_only"
    dora: bool = False

    def parameters(self, shape: ModelShape) -> int:
        """Trainable adapter parameters: A (r x in) and B (out x r) per wrapped layer, DoRA's magnitude
        vector (out), and the biases `--lora_bias` trains."""
        wrapped = lora_targets(shape, self.targets)
        per_block = sum(self.rank * (linear.inputs + linear.outputs) for linear in wrapped.values())
        if self.dora:
            per_block += sum(linear.outputs for linear in wrapped.values())
        if self.bias == "all":
            per_block += sum(linear.outputs for linear in shape.block_linears().values() if linear.bias)
        elif self.bias == "lora_only":
            per_block += sum(linear.outputs for linear in wrapped.values() if linear.bias)
        return shape.layers * per_block

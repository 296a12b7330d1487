"""Model FLOPs per training step, per mode, and the measured peak of a large float32 matmul.

Model FLOPs count the work a training step needs for its real tokens, whatever the implementation
does (the usual MFU convention: no recomputation, no padding). A matmul of an [n x k] by a [k x m]
matrix is 2nkm FLOPs. Per layer with weight W (k inputs, m outputs) and T tokens:

    forward 2Tkm;  backward: input gradient 2Tkm, weight gradient 2Tkm only when W is trained.

So a trained weight costs 6 FLOPs per parameter and token, a frozen one 4 (its input gradient is still
needed by the layers below; with frozen embeddings the first block's c_attn needs none, and autograd
skips it, so it is not counted either). Per mode, with N_blocks the weights of the transformer blocks, N_lora the
adapter weights (rank r on every c_attn, c_proj, w1, w2: r*(k+m) each), V*h the output layer, T real
tokens, S supervised targets (positions whose next token is trained on) and L the length of each
sample (segment):

    full          6*N_blocks*T + 6*V*h*S                  + attention
    LoRA, Q-LoRA  4*N_blocks*T + 6*N_lora*T + 4*V*h*S     + attention
    LoRA+emb      4*N_blocks*T + 6*N_lora*T + 6*V*h*S     + attention
    attention     6 * layers * d * sum(L^2)   (causal: QK^T and AV over L^2/2 pairs, 2 FLOPs each, forward
                  2*L^2*d, backward twice that; d = heads * head_dim)

The output layer counts only supervised positions because only they enter the loss: logits of other
positions are wasted work (the original recipe computes them, our chunked loss does not). The embedding
lookup and its gradient are gathers/scatters, 0 FLOPs; norms, activations, softmax and the optimizer are
not counted (as usual). Q-LoRA's dequantisation is not counted: its matmuls count as float32 ones.

"Executed" FLOPs (a second figure) count what the implementation actually multiplies: the baseline runs
the blocks and the output layer on every padded position; a padded or grouped row runs masked attention
over its full width (all W^2 pairs); a packed row runs causal attention per sample (as model FLOPs). The
toolkit's chunked loss projects supervised positions only and forms the gradients in the same pass
(forward, input gradient, weight gradient when trained; with trainable embeddings too, since the fused
loss resolves PEFT's wrapped lm_head). TRL's loss on CPU projects every position and recomputes the
projection in backward (`OutputLayerWork`); the toolkit's preference log-probabilities project answer
positions only, checkpointed per chunk.

DPO adds the reference pass (the policy with its adapter switched off, no gradients) over the same
sequences: 2*N_blocks*T + 2*V*h*S + a third of the attention, to the model FLOPs as to the executed ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Any

import torch

LORA_TARGET_SHAPES = ("c_attn", "attn.c_proj", "w1", "w2", "mlp.c_proj")  # peft matches both c_proj


@dataclass(frozen=True)
class ModelShape:
    hidden: int
    layers: int
    attention_width: int  # heads * head_dim
    mlp_width: int  # intermediate_size // 2
    vocab: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelShape:
        return cls(
            hidden=config["hidden_size"],
            layers=config["num_hidden_layers"],
            attention_width=config["num_attention_heads"] * config["kv_channels"],
            mlp_width=config["intermediate_size"] // 2,
            vocab=config["vocab_size"],
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(inputs, outputs) of each linear layer of one block."""
        h, d, m = self.hidden, self.attention_width, self.mlp_width
        return {"c_attn": (h, 3 * d), "attn.c_proj": (d, h), "w1": (h, m), "w2": (h, m), "mlp.c_proj": (m, h)}

    @property
    def block_weights(self) -> int:
        return self.layers * sum(k * m for k, m in self.linear_shapes().values())

    def lora_weights(self, rank: int) -> int:
        shapes = self.linear_shapes()
        return self.layers * sum(rank * (shapes[name][0] + shapes[name][1]) for name in LORA_TARGET_SHAPES)

    @property
    def output_weights(self) -> int:
        return self.vocab * self.hidden


@dataclass
class StepTokens:
    """What one optimizer step processed (summed over its micro-batches)."""

    real_tokens: int = 0  # non-padding tokens
    supervised: int = 0  # prediction targets that enter the loss
    padded_tokens: int = 0  # positions computed, padding included
    sum_squared_segments: int = 0  # sum of L^2 over samples (segments of packed rows)
    sum_squared_rows: int = 0  # sum of (row width)^2 over rows, as the attention kernel runs them

    def add(self, other: StepTokens) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


def unneeded_input_gradient(shape: ModelShape, mode: str, lora_rank: int, positions: int) -> int:
    """With frozen embeddings, nothing below the first c_attn needs a gradient: autograd skips the input
    gradient of that layer (and of its LoRA A matrix)."""
    if mode in ("full", "lora_emb"):
        return 0
    inputs, outputs = shape.linear_shapes()["c_attn"]
    return 2 * positions * (inputs * outputs + lora_rank * inputs)


def reference_forward_flops(shape: ModelShape, tokens: StepTokens, projected: int, attention: float) -> float:
    """DPO's reference pass (the policy with its adapter switched off): the blocks' forward, the output
    layer on `projected` positions, a third of the attention's training FLOPs."""
    return 2 * shape.block_weights * tokens.real_tokens + 2 * shape.output_weights * projected + attention / 3


def model_flops(
    shape: ModelShape, mode: str, lora_rank: int, tokens: StepTokens, reference_forward: bool = False
) -> float:
    """FLOPs the step needs for its real tokens (see the module docstring), with DPO's reference pass
    over the same sequences when `reference_forward`."""
    attention = 6 * shape.layers * shape.attention_width * tokens.sum_squared_segments
    reference = (
        reference_forward_flops(shape, tokens, tokens.supervised, attention) if reference_forward else 0
    )
    if mode == "full":
        return (
            6 * shape.block_weights * tokens.real_tokens
            + 6 * shape.output_weights * tokens.supervised
            + attention
            + reference
        )
    output_factor = 6 if mode == "lora_emb" else 4
    return (
        4 * shape.block_weights * tokens.real_tokens
        + 6 * shape.lora_weights(lora_rank) * tokens.real_tokens
        - unneeded_input_gradient(shape, mode, lora_rank, tokens.real_tokens)
        + output_factor * shape.output_weights * tokens.supervised
        + attention
        + reference
    )


@dataclass(frozen=True)
class OutputLayerWork:
    """How a loss runs the output layer: on every position or on supervised ones only, and whether its
    backward recomputes the projection (a checkpointed loss) or not."""

    every_position: bool
    recomputed: bool


ORIGINAL_LOSS = OutputLayerWork(every_position=True, recomputed=False)  # full logits (the baseline)
FUSED_LOSS = OutputLayerWork(every_position=False, recomputed=False)  # the toolkit's chunked loss
# The toolkit's preference log-probabilities: answer positions only, each chunk checkpointed.
CHECKPOINTED_LOSS = OutputLayerWork(every_position=False, recomputed=True)
# TRL's chunked log-probabilities: on CPU every position is projected (only its Triton path on a GPU
# skips unsupervised ones), and backward recomputes each tile's logits.
TRL_CPU_LOSS = OutputLayerWork(every_position=True, recomputed=True)


def executed_flops(
    shape: ModelShape,
    mode: str,
    lora_rank: int,
    tokens: StepTokens,
    output: OutputLayerWork,
    packed: bool,
    checkpointing: bool = False,
    reference_forward: bool = False,
) -> float:
    """FLOPs the implementation runs: padding included, masked attention over whole unpacked rows, the
    output layer as `output` says, each block's forward twice with activation checkpointing, DPO's
    reference pass over the same rows (see the module docstring)."""
    positions = tokens.padded_tokens
    if packed:
        attention = 6 * shape.layers * shape.attention_width * tokens.sum_squared_segments
    else:  # a mask over the whole row, not causal-halved
        attention = 2 * 6 * shape.layers * shape.attention_width * tokens.sum_squared_rows
    block_factor = 6 if mode == "full" else 4
    blocks = block_factor * shape.block_weights * positions
    if mode != "full":
        blocks += 6 * shape.lora_weights(lora_rank) * positions
        blocks -= unneeded_input_gradient(shape, mode, lora_rank, positions)
    if checkpointing:  # the recomputed forward: 2 FLOPs per weight and position, a third of attention
        blocks += (
            2 * (shape.block_weights + (shape.lora_weights(lora_rank) if mode != "full" else 0)) * positions
        )
        attention += attention // 3
    # forward and input gradient, the recomputed forward, the weight gradient when trained
    factor = 4 + (2 if output.recomputed else 0) + (2 if mode in ("full", "lora_emb") else 0)
    projected = positions if output.every_position else tokens.supervised
    executed: float = blocks + factor * shape.output_weights * projected + attention
    if reference_forward:
        padded = replace(tokens, real_tokens=positions)
        executed += reference_forward_flops(shape, padded, projected, attention)
    return executed


def matmul_peak_flops(sizes: tuple[int, ...] = (2048, 4096), repeats: int = 5) -> dict[str, Any]:
    """Best float32 matmul rate over a few square sizes (FLOP/s), all threads torch uses.

    The best of several repetitions is kept: on a shared machine it is the closest to the hardware's
    attainable peak.
    """
    generator = torch.Generator().manual_seed(0)
    best: dict[int, float] = {}
    for size in sizes:
        a = torch.randn(size, size, generator=generator)
        b = torch.randn(size, size, generator=generator)
        out = torch.empty(size, size)
        torch.matmul(a, b, out=out)  # warm-up
        rates = []
        for _ in range(repeats):
            started = time.perf_counter()
            torch.matmul(a, b, out=out)
            rates.append(2 * size**3 / (time.perf_counter() - started))
        best[size] = max(rates)
    peak_size = max(best, key=lambda size: best[size])
    return {
        "peak_flops": best[peak_size],
        "peak_size": peak_size,
        "by_size": {str(size): rate for size, rate in best.items()},
        "threads": torch.get_num_threads(),
        "dtype": "float32",
    }

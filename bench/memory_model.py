"""On-paper GPU memory per training mode for the released Qwen sizes, one sequence of N tokens.

    python bench/memory_model.py [--tokens 2048]

Prints the Markdown table of bench/README.md ("On paper, for GPU users"). Everything is an estimate in
GB (1e9 bytes) for one GPU, batch 1, bf16 compute, AdamW; the terms and their assumptions:

    weights       bf16 (2 bytes/parameter); Q-LoRA: int4 GPTQ blocks (0.5 byte + 1/32 for group-128 fp16
                  scales and zeros) with embeddings and lm_head kept in fp16/bf16.
    trainable     LoRA r=64 on c_attn, attn.c_proj, w1, w2, mlp.c_proj, kept in fp32 by PEFT: weight 4,
                  gradient 4, Adam moments 8 = 16 bytes/parameter. LoRA(emb) adds trainable copies of wte
                  and lm_head (PEFT modules_to_save keeps the frozen original too) in bf16 with bf16 grads
                  and Adam moments: 2 (copy) + 2 (grad) + 4 (moments) = 8 bytes/parameter.
                  Full fine-tuning: bf16 weights + fp32 master + fp32 Adam + bf16 grads = 16 bytes/parameter
                  (what ZeRO partitions across GPUs; shown for one GPU holding everything).
    activations   per layer and token, bf16, flash attention (no L^2 term): the tensors a Qwen block keeps
                  for backward, about 10 hidden-sized and 4 MLP-sized vectors plus the float32 RMSNorm inputs
                  (2 x 4 bytes x hidden) and, for LoRA, 5 adapter inputs (dropout): ~ (2*(10h + 4m) + 8h
                  + 10h) bytes. With gradient checkpointing only each block's input (2h bytes) is kept, plus
                  one block's activations while it is recomputed.
    logits        original: the full [N x vocab] bf16 logits, a contiguous shifted copy, the float32
                  upcast inside the loss and its gradient: ~ N*vocab*(2 + 2 + 4 + 4) bytes.
                  chunked (ours): one chunk of min(N, LOSS_CHUNK_TOKENS = 256) supervised positions in float32
                  and its gradient: ~ chunk*vocab*8 bytes, whatever N is.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from qwen_model.chunked_loss import LOSS_CHUNK_TOKENS

GB = 1e9
LORA_RANK = 64


@dataclass(frozen=True)
class Size:
    name: str
    hidden: int
    layers: int
    mlp: int  # intermediate_size // 2
    vocab: int
    published_2048: dict[str, str]  # the original README's single-A100 profile at 2048 tokens

    @property
    def block_parameters(self) -> int:
        h, m = self.hidden, self.mlp
        return self.layers * (h * 3 * h + h * h + 3 * h * m)

    @property
    def embedding_parameters(self) -> int:
        return 2 * self.vocab * self.hidden

    @property
    def lora_parameters(self) -> int:
        h, m = self.hidden, self.mlp
        shapes = [(h, 3 * h), (h, h), (h, m), (h, m), (m, h)]
        return self.layers * sum(LORA_RANK * (k + n) for k, n in shapes)


# Released configs (hidden, layers, intermediate_size // 2, vocab rows) and the original's published
# figures (README "Profiling of Memory and Speed", one A100-80G, batch 1, flash attention 2, gradient
# checkpointing as in its LoRA scripts; 72B LoRA was on 4 GPUs with ZeRO-3, not comparable per GPU).
SIZES = [
    Size(
        "1.8B", 2048, 24, 5504, 151936, {"lora": "11.0", "lora_emb": "15.1", "qlora": "7.8", "full": "43.5"}
    ),
    Size("7B", 4096, 32, 11008, 151936, {"lora": "23.8", "lora_emb": "35.1", "qlora": "13.9", "full": "-"}),
    Size("14B", 5120, 40, 13696, 152064, {"lora": "37.4", "lora_emb": "54.1", "qlora": "19.9", "full": "-"}),
    Size("72B", 8192, 80, 24576, 152064, {"lora": "-", "lora_emb": "-", "qlora": "64.1", "full": "-"}),
]


def weights_bytes(size: Size, mode: str) -> float:
    if mode == "qlora":
        return size.block_parameters * (0.5 + 1 / 32) + 2 * size.embedding_parameters
    return 2 * (size.block_parameters + size.embedding_parameters)


def trainable_bytes(size: Size, mode: str) -> float:
    if mode == "full":
        return 14 * (size.block_parameters + size.embedding_parameters)  # + the 2 bytes counted as weights
    extra = 8 * size.embedding_parameters if mode == "lora_emb" else 0
    return 16 * size.lora_parameters + extra


def activation_bytes(size: Size, mode: str, tokens: int, checkpointing: bool) -> float:
    h, m = size.hidden, size.mlp
    per_layer = 2 * (10 * h + 4 * m) + 8 * h + (0 if mode == "full" else 10 * h)
    if checkpointing:
        return tokens * (size.layers * 2 * h + per_layer)
    return tokens * size.layers * per_layer


def logits_bytes(size: Size, tokens: int, chunked: bool) -> float:
    if chunked:
        return min(tokens, LOSS_CHUNK_TOKENS) * size.vocab * 8
    return tokens * size.vocab * 12


def table(tokens: int) -> str:
    modes = [("lora", "LoRA"), ("lora_emb", "LoRA (emb)"), ("qlora", "Q-LoRA int4"), ("full", "full (1 GPU)")]
    lines = [
        f"| size | mode | weights | trainable state | activations no GC / GC | logits original / chunked | "
        f"total original (GC) | total ours (GC, chunked) | total ours (no GC) | published (original, {tokens}) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for size in SIZES:
        for mode, label in modes:
            weights = weights_bytes(size, mode)
            state = trainable_bytes(size, mode)
            plain, checkpointed = (activation_bytes(size, mode, tokens, gc) for gc in (False, True))
            original_logits, chunked_logits = (
                logits_bytes(size, tokens, False),
                logits_bytes(size, tokens, True),
            )
            original = weights + state + checkpointed + original_logits
            ours = weights + state + checkpointed + chunked_logits
            ours_no_gc = weights + state + plain + chunked_logits
            published = size.published_2048[mode] if tokens == 2048 else "-"
            lines.append(
                f"| {size.name} | {label} | {weights / GB:.1f} | {state / GB:.1f} | {plain / GB:.1f} / "
                f"{checkpointed / GB:.1f} | {original_logits / GB:.2f} / {chunked_logits / GB:.2f} | "
                f"{original / GB:.1f} | {ours / GB:.1f} | {ours_no_gc / GB:.1f} | {published} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    print(table(parser.parse_args().tokens))


if __name__ == "__main__":
    main()

"""What autograd keeps for backward in one forward pass of the bundled model, and the loss's buffers.

The per-layer terms are the tensors qwen_model/modeling_qwen.py and PEFT's LoRA layers save, counted
once per storage (a view keeps its whole base alive), per token; tests/test_memory_plan.py checks them
against `torch.autograd.graph.saved_tensors_hooks` on small models. With e the compute dtype's bytes
and h, d, m the hidden, attention and MLP widths:

    norms (ln_1, ln_2)   their input in float32 (4h each) and 1/rms (4); with trainable norm weights
                         (full fine-tuning) also the normalised value (e*h each)
    attention            q and k after RoPE (e*d each), the fused qkv output kept by the value view
                         (3*e*d), the attention output (e*d), the log-sum-exp (4 per head); packed rows
                         under SDPA (per-sample attention) keep the re-joined output too when c_proj
                         trains; masked rows keep contiguous q/k/v/out copies (4*e*d)
    MLP                  w1 and w2 outputs and silu(w2) (3*e*m), plus the product when c_proj trains
    trained linears      their inputs: c_attn and w1/w2 share one (e*h each), c_proj's is counted above
    LoRA, per target     the dropout's byte mask (qwen_finetune/lora_dropout.py on the CPU, PyTorch's
                         fused dropout on CUDA) and its output, the input of A, in the adapter's dtype,
                         and A's output (r values); without dropout
                         only A's input (shared with the frozen layer when the dtypes match)

With gradient checkpointing each checkpointed block keeps only its input (e*h per token); during
backward one block is recomputed at a time, so one block's tensors come back on top. With
`every_n_layers` n (transformers' partial checkpointing) only blocks 0, n, 2n, ... are checkpointed and
the others keep what they would keep without it.
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen_model.chunked_loss import LOSS_CHUNK_TOKENS

from .run_setup import PRECISION_BYTES, TrainingSetup
from .shapes import lora_targets

FLOAT32 = 4
MASK_BYTES = 1  # a dropout's boolean keep-mask
INDEX_BYTES = 8  # int64 token ids and row indices
# glibc raises its mmap threshold up to this as mapped blocks are freed; smaller tensors live in the heap.
GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20
# Float32 [chunk x vocab] buffers alive at once while the checkpointed loss (a projection that cannot be
# fused) handles a chunk: the logits upcast to float32, the log-softmax, and its gradient in backward
# (measured on CPU: 2.2 in forward, 3.2 in backward).
CHECKPOINTED_LOSS_BUFFERS = 3
# The original recipe's loss over full logits keeps, per position and vocabulary entry, the logits and
# their shifted contiguous copy in the compute dtype, and two more tensors: the log-softmax and its
# gradient, which autocast computes in float32 and a model DeepSpeed cast to half precision in half.
LOG_SOFTMAX_COPIES = 2


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes kept for backward in one micro-batch, per device."""

    per_layer: int  # one block's saved tensors
    first_layer_saving: int  # what block 0 does not keep (its input needs no gradient)
    model_level: int  # outside the blocks: rotary tables, ln_f, token ids, the loss's saved features
    without_checkpointing: int
    with_checkpointing: int

    def for_setup(self, setup: TrainingSetup) -> int:
        return self.with_checkpointing if setup.gradient_checkpointing else self.without_checkpointing


def adapter_bytes(setup: TrainingSetup) -> int:
    """Bytes per element of the LoRA weights and the tensors they see: PEFT keeps adapters in float32
    unless DeepSpeed casts the whole model to the compute dtype."""
    if setup.zero is not None:
        return setup.compute_bytes
    return FLOAT32


def trained_weight_bytes(setup: TrainingSetup) -> int:
    """Bytes per element of a fully trained weight (and its gradient): DeepSpeed casts the model to
    the compute dtype (its float32 master copy lives in the optimizer); otherwise the load dtype."""
    if setup.zero is not None:
        return setup.compute_bytes
    return PRECISION_BYTES[setup.weight_precision]


def block_tensors_per_token(setup: TrainingSetup) -> list[int]:
    """Bytes per token position of each tensor one block saves (see the module docstring)."""
    shape, e = setup.shape, setup.compute_bytes
    h, d, m = shape.hidden, shape.attention_width, shape.mlp_width
    full = setup.method == "full"
    tensors = [FLOAT32 * h, FLOAT32, FLOAT32 * h, FLOAT32]  # ln_1 and ln_2: input and 1/rms
    if full:
        tensors += [e * h, e * h]  # the normalised values, for the norm weights' gradients
    tensors += [e * d, e * d, 3 * e * d, e * d, FLOAT32 * shape.heads]  # q, k, qkv, output, lse
    if setup.masked_attention:
        tensors += [e * d] * 4
    elif setup.packing and full:
        tensors.append(e * d)
    tensors += [e * m] * (4 if full else 3)
    if full:
        tensors += [e * h, e * h]  # the inputs of c_attn and of w1/w2
    return tensors + _adapter_tensors_per_token(setup)


def block_bytes_per_token(setup: TrainingSetup) -> int:
    return sum(block_tensors_per_token(setup))


def _adapter_tensors_per_token(setup: TrainingSetup) -> list[int]:
    if setup.adapter is None:
        return []
    a, e = adapter_bytes(setup), setup.compute_bytes
    wrapped = lora_targets(setup.shape, setup.adapter.targets)
    tensors: list[int] = []
    if setup.lora_dropout > 0:
        for linear in wrapped.values():
            tensors += [MASK_BYTES * linear.inputs, a * linear.inputs]
    elif a != e:
        tensors += [a * linear.inputs for linear in wrapped.values()]
    else:  # A keeps the frozen layer's own input: w1 and w2 share theirs, and attn.c_proj's is the
        # attention output already counted (unless packed rows re-join it into a new tensor)
        distinct_inputs = {path.replace("w2", "w1"): linear.inputs for path, linear in wrapped.items()}
        if not setup.packing:
            distinct_inputs.pop("attn.c_proj", None)
        tensors += [e * inputs for inputs in distinct_inputs.values()]
    return tensors + [a * setup.adapter.rank] * len(wrapped)


def _first_block_saving_per_token(setup: TrainingSetup) -> int:
    """Block 0's input needs no gradient when the embeddings are frozen: ln_1 keeps nothing, and the
    dropout in front of c_attn's adapter keeps no noise (only its output, for A's gradient)."""
    saving = FLOAT32 * setup.shape.hidden + FLOAT32
    wrapped = lora_targets(setup.shape, setup.adapter.targets) if setup.adapter is not None else {}
    if "attn.c_attn" in wrapped and setup.lora_dropout > 0:
        saving += MASK_BYTES * setup.shape.hidden
    return saving


def model_level_bytes_per_token(setup: TrainingSetup) -> int:
    """Outside the blocks, per position: the gathered rotary cos/sin (float32), ln_f like a norm above,
    the token ids (trainable wte), and for the loss the selected features' gradient and row index
    (upper bound: every position supervised)."""
    shape, e = setup.shape, setup.compute_bytes
    rotary = 2 * FLOAT32 * shape.rotary_dim
    final_norm = FLOAT32 * shape.hidden + FLOAT32 + (e * shape.hidden if setup.method == "full" else 0)
    token_ids = INDEX_BYTES if setup.embeddings_trained else 0
    loss_features = (e * shape.hidden + INDEX_BYTES) if setup.loss == "chunked" else 0
    mask = setup.max_length if setup.masked_attention else 0
    return rotary + final_norm + token_ids + loss_features + mask


def estimate_activations(setup: TrainingSetup) -> ActivationEstimate:
    positions = setup.positions_per_micro_batch
    layers = setup.shape.layers
    per_layer = positions * block_bytes_per_token(setup)
    input_needs_grad = setup.embeddings_trained or setup.gradient_checkpointing
    first_layer_saving = 0 if input_needs_grad else positions * _first_block_saving_per_token(setup)
    model_level = positions * model_level_bytes_per_token(setup)
    without = layers * per_layer - first_layer_saving + model_level
    checkpointed = setup.checkpointed_layers
    checkpoints = checkpointed * positions * setup.compute_bytes * setup.shape.hidden
    kept_blocks = (layers - checkpointed) * per_layer
    recomputed_block = per_layer + 2 * positions * setup.compute_bytes * setup.shape.hidden  # + its grads
    return ActivationEstimate(
        per_layer=per_layer,
        first_layer_saving=first_layer_saving,
        model_level=model_level,
        without_checkpointing=without,
        with_checkpointing=checkpoints + kept_blocks + recomputed_block + model_level,
    )


def heap_retention_bytes(setup: TrainingSetup, estimate: ActivationEstimate) -> int:
    """CPU: what glibc's heap keeps resident after the tensors in it are freed (memory.py's docstring).

    Without checkpointing, the previous step's activations, counted once. With it, every block's
    checkpointed block's forward (and its recomputation in backward) frees the same tensors a block
    would save, and the holes left by the ones below glibc's mmap threshold add up block after block:
    one block's worth per checkpointed layer (measured on the 1.8B shape at 2048 positions: 0.16 GB per
    layer for LoRA and 0.22 for NF4 Q-LoRA, against 0.22 counted). Tensors above the threshold are
    mapped and unmapped and leave none, unless glibc keeps freed memory (--keep_freed_memory): then
    they come from the heap too, and the heap holds one block's worth of them in use plus, per
    checkpointed layer, a hole the size of the largest (measured with the 1.8B widths at 2048 positions,
    LoRA: 0.33 GiB more at 4 layers and 1.22 GiB at 24, counted 0.40 and 1.34). Blocks left out by
    `every_n_layers` count as without it.
    """
    if setup.device_kind != "cpu":
        return 0
    if not setup.gradient_checkpointing:
        return estimate.without_checkpointing
    positions = setup.positions_per_micro_batch
    sizes = [positions * per_token for per_token in block_tensors_per_token(setup)]
    heap_block = sum(size for size in sizes if size < GLIBC_MMAP_THRESHOLD_MAX)
    checkpointed = setup.checkpointed_layers
    retained = checkpointed * heap_block + (setup.shape.layers - checkpointed) * estimate.per_layer
    mapped = [size for size in sizes if size >= GLIBC_MMAP_THRESHOLD_MAX]
    if setup.keeps_freed_memory and mapped:
        retained += sum(mapped) + checkpointed * max(mapped)
    return retained


def loss_chunk_tokens(setup: TrainingSetup) -> int:
    return min(setup.positions_per_micro_batch, LOSS_CHUNK_TOKENS)


def fused_loss_applies(setup: TrainingSetup) -> bool:
    """chunked_loss.fusable_weight: lm_head is a plain linear layer, or PEFT's modules_to_save wrapper
    of one; not when ZeRO-3 partitions it or an adapter sits on it."""
    adapter_on_head = setup.adapter is not None and "lm_head" in setup.adapter.targets
    return setup.loss == "chunked" and setup.zero_stage != 3 and not adapter_on_head


def output_layer_bytes(setup: TrainingSetup) -> int:
    """Bytes per element of lm_head's weight: trained (full), or as loaded (float32 on an NF4 base)."""
    if setup.method == "full" or setup.zero is not None:
        return trained_weight_bytes(setup)
    if setup.quantization == "nf4":
        return FLOAT32
    return PRECISION_BYTES[setup.weight_precision]


def loss_buffer_bytes(setup: TrainingSetup) -> int:
    """The loss's transient buffers while it runs (forward, or the recomputation in backward).

    Fused: one float32 [chunk x vocab] buffer reused by every chunk and kept between steps
    (kept_loss_buffer_bytes); a half-precision lm_head adds the chunk's matmul output before it is
    copied in and the gradient cast back (chunk x vocab each).
    """
    vocab = setup.shape.vocab
    if setup.loss == "full_logits":
        e = setup.compute_bytes
        log_softmax = FLOAT32 if setup.zero is None else e  # autocast upcasts; DeepSpeed's cast does not
        per_entry = 2 * e + LOG_SOFTMAX_COPIES * log_softmax
        return per_entry * setup.positions_per_micro_batch * vocab
    chunk = loss_chunk_tokens(setup) * vocab
    if not fused_loss_applies(setup):
        return CHECKPOINTED_LOSS_BUFFERS * chunk * FLOAT32
    weight = output_layer_bytes(setup)
    return kept_loss_buffer_bytes(setup) + (0 if weight == FLOAT32 else 2 * chunk * weight)


def kept_loss_buffer_bytes(setup: TrainingSetup) -> int:
    """The part of the loss's buffers that outlives the step: the fused loss's float32 chunk of logits
    (chunked_loss.project_into_scratch), resident from the first forward pass on, in every phase."""
    if not fused_loss_applies(setup):
        return 0
    return loss_chunk_tokens(setup) * setup.shape.vocab * FLOAT32


def fused_weight_gradient_bytes(setup: TrainingSetup) -> int:
    """A trained lm_head (full fine-tuning, or PEFT's trainable copy) gets its gradient during the fused
    loss's forward pass: one [vocab x hidden] buffer, kept until backward, which hands out a scaled copy
    as lm_head's gradient."""
    if not setup.embeddings_trained or not fused_loss_applies(setup):
        return 0
    return setup.shape.embedding_parameters * output_layer_bytes(setup)

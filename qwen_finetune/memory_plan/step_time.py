"""FLOPs of one optimizer step and the time they take at the device's peak.

A matmul of [n x k] by [k x m] is 2nkm FLOPs. A trained weight costs 6 FLOPs per parameter and token
(forward, input gradient, weight gradient), a frozen one 4 (the layers below still need the input
gradient). Per token, with N the blocks' matrix weights, N_a the adapter's, V*h the output layer and L
the row length (bench/flops.py uses the same conventions on measured batches):

    full                6N + 6Vh           + attention
    LoRA, Q-LoRA        4N + 6N_a + 4Vh    + attention     (LoRA with embeddings: 6Vh)
    attention           6 * layers * d * L per token (causal: half of the L^2 pairs, forward and
                        twice that backward)
    executed extra      gradient checkpointing runs each block's forward again (+2N + 2N_a + a third of
                        the attention; with every_n_layers, the checkpointed blocks' share of it);
                        a checkpointed loss (wrapped lm_head) projects twice (+2Vh)
    preference stage    chosen and rejected rows both run; the reference log-probabilities cost a
                        forward pass (2N + 2Vh + a third of the attention) unless precomputed

The plan cannot see the data, so every position counts as a real, supervised token of a row
model_max_length long: an upper bound for unpacked batches, exact for full packed rows apart from
attention (packed samples attend only within themselves, which costs less).
"""

from __future__ import annotations

from dataclasses import dataclass

from .activations import fused_loss_applies
from .devices import Device
from .run_setup import TrainingSetup

# The share of the peak a training step reaches: measured on CPU by bench/ (about 50% for LoRA and
# full fine-tuning on packed rows), typical of bf16 training on data-centre GPUs.
EXPECTED_UTILISATION = {"cpu": 0.5, "cuda": 0.4}


@dataclass(frozen=True)
class StepTime:
    model_flops: float  # what the step needs (the MFU convention)
    executed_flops: float  # with recomputation
    tokens: int  # positions per optimizer step on this device
    seconds_at_peak: float | None
    expected_seconds: float | None
    utilisation: float
    peak_flops: float | None
    peak_source: str


def flops_per_token(setup: TrainingSetup) -> tuple[float, float]:
    """(model FLOPs, executed FLOPs) per position of a micro-batch."""
    shape = setup.shape
    blocks = shape.block_linear_weights
    output = shape.embedding_parameters
    attention = 6.0 * shape.layers * shape.attention_width * setup.max_length
    if setup.adapter is None:
        model: float = 6 * blocks + 6 * output + attention
        adapters = 0
    else:
        adapters = setup.adapter.parameters(shape)
        output_factor = 6 if setup.embeddings_trained else 4
        model = 4 * blocks + 6 * adapters + output_factor * output + attention
    executed: float = model
    if setup.gradient_checkpointing:
        recomputed_share = setup.checkpointed_layers / shape.layers
        executed += recomputed_share * (2 * blocks + 2 * adapters + attention / 3)
    if setup.loss == "chunked" and not fused_loss_applies(setup):
        executed += 2 * output
    if setup.preference is not None and setup.preference.reference not in ("precomputed", "none"):
        reference = 2 * blocks + 2 * output + attention / 3
        model += reference
        executed += reference
    return model, executed


def estimate_step_time(setup: TrainingSetup, device: Device) -> StepTime:
    tokens = setup.positions_per_micro_batch * setup.accumulation
    model_per_token, executed_per_token = flops_per_token(setup)
    model, executed = model_per_token * tokens, executed_per_token * tokens
    utilisation = EXPECTED_UTILISATION[device.kind]
    at_peak = executed / device.peak_flops if device.peak_flops else None
    expected = at_peak / utilisation if at_peak is not None else None
    return StepTime(
        model, executed, tokens, at_peak, expected, utilisation, device.peak_flops, device.peak_source
    )

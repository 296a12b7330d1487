"""Memory per device of a training run, component by component and at each phase of a step.

Components (bytes per device):

    weights            the model as it sits in memory: full precision, or the quantized blocks (NF4:
                       4 bits + one byte of absmax per 64 and a float32 per 256 of those; GPTQ: b bits,
                       an fp16 scale and a b-bit zero per group, an int32 group index per input row)
                       with embeddings, lm_head, norms and biases unquantized (float32 on an NF4 base,
                       as PEFT's prepare_model_for_kbit_training upcasts them); LoRA adapters (float32
                       unless DeepSpeed casts them) and, with trainable embeddings, PEFT's trainable
                       copies of wte and lm_head next to the frozen originals; under autocast, the
                       half-precision copies of float32 weights that backward keeps
    gradients          one per trainable parameter, in its dtype (ZeRO-2/3: this process's partition)
    optimizer states   AdamW's two moments in the parameter's dtype; under DeepSpeed a float32 master
                       copy and float32 moments of this process's partition (nothing when offloaded)
    activations        what backward needs (activations.py), with or without gradient checkpointing
    loss buffers       the loss's float32 chunk of logits (activations.loss_buffer_bytes), which the
                       fused loss keeps between steps (resident in every phase); the fused loss of a
                       trained lm_head also holds that layer's gradient from the forward pass on
    deepspeed buffers  ZeRO-2's gradient buckets (two with overlap_comm), ZeRO-3's bucket and the
                       parameters gathered for the layers being computed
    heap retention     CPU only: glibc's heap keeps freed tensors below its 32 MB mmap threshold resident,
                       and later tensors fill those holes only in part. Without checkpointing: the
                       previous step's activations (measured at 0.6 to 1.2 times the activations,
                       counted as once); with it, one block's heap-sized tensors per layer
                       (activations.heap_retention_bytes), and with --keep_freed_memory (the CPU
                       default) the larger tensors of a block and a hole per layer on top. With
                       MALLOC_MMAP_THRESHOLD_=65536 and --keep_freed_memory no it disappears and the
                       plan without it is within 5%, at a cost of 10 to 20% of the tokens/s (measured).
    runtime            CPU: the training process itself (Python, torch, transformers, PEFT, tokenizer,
                       data), measured; CUDA: the context and kernels

Phases (the peak is the largest):

    loading            runtime + weights + the checkpoint's pages while they are converted (CPU)
    forward            + optimizer states + gradients kept across accumulation + activations + loss
    backward           + all gradients (ZeRO-2/3: partitions and buckets), activations released
    optimizer step     + the step's temporaries (AdamW's denominator; DeepSpeed's float32 gradients)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .activations import (
    FLOAT32,
    ActivationEstimate,
    adapter_bytes,
    estimate_activations,
    fused_loss_applies,
    fused_weight_gradient_bytes,
    heap_retention_bytes,
    kept_loss_buffer_bytes,
    loss_buffer_bytes,
    trained_weight_bytes,
)
from .run_setup import PRECISION_BYTES, TrainingSetup

# bitsandbytes NF4 with double quantization: 4 bits, an 8-bit absmax per 64 values, a float32 per 256
# absmax values.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
GPTQ_SCALE_BYTES = 2  # fp16 scale per group and output
GPTQ_GROUP_INDEX_BYTES = 4  # int32 g_idx per input row

# The training process on CPU without the model: Python, torch, transformers, PEFT, datasets, the
# tokenizer's tables, the encoded data, the Trainer. Measured as a training run's peak RSS minus the
# plan's tensors on the tiny model, where the tensors are small (the "implied runtime" column of
# `python bench/plan_vs_measured.py --models tiny`: 0.64 to 0.73 GB); backends add their imports.
CPU_PROCESS_BYTES = 680_000_000
CPU_BACKEND_IMPORT_BYTES = {"gptq": 70_000_000, "nf4": 0, "deepspeed": 25_000_000}
# A CUDA process's context, cuBLAS workspace and loaded kernels (not visible to torch's allocator).
CUDA_CONTEXT_BYTES = 500_000_000

# Bytes per parameter of each optimizer's state, in units of the parameter's own size (AdamW: two
# moments) or in absolute bytes (8-bit optimizers).
OPTIMIZER_STATE_COPIES = {"adamw": 2.0, "adagrad": 1.0, "sgd": 0.0, "adafactor": 0.0}
OPTIMIZER_STATE_BYTES_8BIT = 2


@dataclass(frozen=True)
class Component:
    key: str
    label: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class MemoryEstimate:
    components: list[Component]
    phases: dict[str, int]
    host: list[Component]  # per node: what DeepSpeed offloads to CPU memory
    activations: ActivationEstimate
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=lambda name: self.phases[name])

    def component(self, key: str) -> int:
        return sum(part.bytes for part in self.components if part.key == key)

    @property
    def host_total(self) -> int:
        return sum(part.bytes for part in self.host)


# ------------------------------------------------------------------------------------------ parameters


def trainable_parameters(setup: TrainingSetup) -> int:
    if setup.adapter is None:
        return setup.shape.total_parameters
    embeddings = 2 * setup.shape.embedding_parameters if setup.embeddings_trained else 0
    return setup.adapter.parameters(setup.shape) + embeddings


def _unquantized_bytes(setup: TrainingSetup) -> int:
    """Bytes per element of what is not quantized (embeddings, norms...): float32 on an NF4 base."""
    if setup.quantization == "nf4":
        return FLOAT32
    return PRECISION_BYTES[setup.weight_precision]


def base_weight_bytes(setup: TrainingSetup) -> int:
    """The pretrained model's weights on one device."""
    shape = setup.shape
    if setup.method == "full":
        return _zero3_share(setup, shape.total_parameters * trained_weight_bytes(setup))
    if setup.quantization == "nf4":
        quantized = shape.block_linear_weights * NF4_BYTES_PER_WEIGHT
        return int(quantized) + shape.unquantized_parameters * FLOAT32
    if setup.quantization == "gptq":
        bits, group = setup.quant_bits, setup.quant_group_size
        per_weight = bits / 8 + (GPTQ_SCALE_BYTES + bits / 8) / group
        inputs = shape.layers * sum(linear.inputs for linear in shape.block_linears().values())
        quantized = shape.block_linear_weights * per_weight + inputs * GPTQ_GROUP_INDEX_BYTES
        return int(quantized) + shape.unquantized_parameters * _unquantized_bytes(setup)
    frozen_bytes = setup.compute_bytes if setup.zero is not None else PRECISION_BYTES[setup.weight_precision]
    return _zero3_share(setup, shape.total_parameters * frozen_bytes)


def _zero3_share(setup: TrainingSetup, total_bytes: int) -> int:
    """ZeRO-3 keeps 1/N of every parameter on each process (small ones below the persistence threshold,
    the norms and biases, whole; they are a negligible share and counted as partitioned)."""
    if setup.zero_stage == 3:
        return total_bytes // setup.world_size
    return total_bytes


def adapter_and_copy_bytes(setup: TrainingSetup) -> int:
    """LoRA adapters, and PEFT's trainable copies of wte and lm_head (modules_to_save), unpartitioned."""
    if setup.adapter is None:
        return 0
    adapters = setup.adapter.parameters(setup.shape) * adapter_bytes(setup)
    copies = 0
    if setup.embeddings_trained:
        element = setup.compute_bytes if setup.zero is not None else _unquantized_bytes(setup)
        copies = 2 * setup.shape.embedding_parameters * element
    return adapters + copies


def trainable_element_bytes(setup: TrainingSetup) -> float:
    """Average bytes per element of the trainable parameters (and of their gradients)."""
    if setup.adapter is None:
        return trained_weight_bytes(setup)
    return adapter_and_copy_bytes(setup) / trainable_parameters(setup)


def autocast_copy_bytes(setup: TrainingSetup) -> int:
    """Autocast keeps a half-precision copy of every float32 weight a matmul uses until backward.
    (DeepSpeed casts the model itself, so there is none.)"""
    if not setup.mixed_precision or setup.zero is not None:
        return 0
    shape = setup.shape
    if setup.method == "full":
        matrices = shape.block_linear_weights + shape.embedding_parameters  # lm_head; wte is a lookup
        return matrices * setup.compute_bytes if setup.weight_precision == "fp32" else 0
    adapters = setup.adapter.parameters(shape) if setup.adapter is not None else 0
    lm_head = shape.embedding_parameters if setup.embeddings_trained and _unquantized_bytes(setup) == 4 else 0
    return (adapters + lm_head) * setup.compute_bytes


# ---------------------------------------------------------------------------------- optimizer, grads


def _known_optimizer_family(name: str) -> str | None:
    lowered = name.lower()
    if "8bit" in lowered:
        return "8bit"
    return next((family for family in OPTIMIZER_STATE_COPIES if lowered.startswith(family)), None)


def _optimizer_family(name: str) -> str:
    """The optimizer's family by --optim name; one the plan does not know is counted as AdamW (and the
    table says so)."""
    return _known_optimizer_family(name) or "adamw"


def optimizer_state_bytes(setup: TrainingSetup) -> tuple[int, int]:
    """(on the device, offloaded to the host) for one process."""
    trainable = trainable_parameters(setup)
    if setup.zero is not None:  # float32 master copy + float32 Adam moments, partitioned from ZeRO-1 on
        share = setup.world_size if setup.zero_stage >= 1 else 1
        states = (FLOAT32 + 2 * FLOAT32) * trainable // share
        return (0, states) if setup.zero.offload_optimizer else (states, 0)
    family = _optimizer_family(setup.optimizer)
    if family == "8bit":
        return trainable * OPTIMIZER_STATE_BYTES_8BIT, 0
    return int(OPTIMIZER_STATE_COPIES[family] * trainable * trainable_element_bytes(setup)), 0


def gradient_bytes(setup: TrainingSetup) -> int:
    """Gradients of one process once backward is done (ZeRO-2/3: the partition it owns)."""
    full = int(trainable_parameters(setup) * trainable_element_bytes(setup))
    if setup.zero_stage >= 2:
        return full // setup.world_size
    return full


def optimizer_step_bytes(setup: TrainingSetup) -> int:
    """Temporaries of the optimizer step: DeepSpeed's float32 copy of the gradient partition (and on
    CPU, where the toolkit runs DeepSpeed with torch's AdamW, that optimizer's denominator over it; on
    CUDA its fused Adam needs none); torch's AdamW on CUDA (foreach) one denominator per parameter at
    once, on CPU (one tensor at a time, its square root and the quotient alive together) two of the
    largest parameter's; the fused AdamW (the default) none: it updates each tensor in place."""
    trainable = trainable_parameters(setup)
    if setup.zero is not None:
        if setup.zero.offload_optimizer:
            return 0
        share = setup.world_size if setup.zero_stage >= 1 else 1
        copies = 2 if setup.device_kind == "cpu" else 1
        return copies * FLOAT32 * trainable // share
    if _optimizer_family(setup.optimizer) not in ("adamw", "adagrad") or "fused" in setup.optimizer:
        return 0
    element = trainable_element_bytes(setup)
    if setup.device_kind == "cuda":
        return int(trainable * element)
    largest = setup.shape.embedding_parameters if setup.embeddings_trained else _largest_adapter(setup)
    return int(2 * largest * element)


def _largest_adapter(setup: TrainingSetup) -> int:
    if setup.adapter is None:
        return setup.shape.embedding_parameters
    linears = setup.shape.block_linears().values()
    return max(setup.adapter.rank * max(linear.inputs, linear.outputs) for linear in linears)


def reference_model_bytes(setup: TrainingSetup) -> int:
    """A preference stage's frozen reference model, when it is a copy (in the compute dtype)."""
    if setup.preference is None or setup.preference.reference != "frozen_copy":
        return 0
    return _zero3_share(setup, setup.shape.total_parameters * setup.compute_bytes)


def _output_layer_gradient_bytes(setup: TrainingSetup) -> int:
    """lm_head's gradient, the first one backward forms (when lm_head trains)."""
    if not setup.embeddings_trained:
        return 0
    full = setup.shape.embedding_parameters * trainable_element_bytes(setup)
    return int(full) // setup.world_size if setup.zero_stage >= 2 else int(full)


# ---------------------------------------------------------------------------------------- deepspeed


def deepspeed_buffer_bytes(setup: TrainingSetup) -> int:
    """ZeRO-2: contiguous gradient buckets of reduce_bucket_size (two with overlap_comm). ZeRO-3: one
    bucket, plus the gathered parameters of the modules being computed (the largest module, lm_head,
    or a block and the prefetch bucket), capped by stage3_max_live_parameters."""
    zero = setup.zero
    if zero is None or zero.stage < 2:
        return 0
    element = setup.compute_bytes
    if zero.stage == 2:
        buckets = 2 if zero.overlap_comm else 1
        return buckets * zero.reduce_bucket_elements * element if zero.contiguous_gradients else 0
    shape = setup.shape
    block = shape.block_parameters // shape.layers
    gathered = max(shape.embedding_parameters, block + zero.prefetch_bucket_elements)
    gathered = min(gathered, zero.max_live_parameters) if zero.max_live_parameters else gathered
    return (zero.reduce_bucket_elements + gathered) * element


def offloaded_parameter_bytes(setup: TrainingSetup) -> int:
    """ZeRO-3 offload_param: the parameter partitions live in host memory."""
    if setup.zero is None or setup.zero_stage != 3 or not setup.zero.offload_params:
        return 0
    return base_weight_bytes(setup) + _zero3_share(setup, adapter_and_copy_bytes(setup))


# ------------------------------------------------------------------------------------------- runtime


def runtime_bytes(setup: TrainingSetup) -> int:
    if setup.device_kind == "cuda":
        return CUDA_CONTEXT_BYTES
    extra = CPU_BACKEND_IMPORT_BYTES.get(setup.quantization or "", 0)
    if setup.zero is not None:
        extra += CPU_BACKEND_IMPORT_BYTES["deepspeed"]
    return CPU_PROCESS_BYTES + extra


def loading_transient_bytes(setup: TrainingSetup) -> int:
    """CPU: while weights are converted to another dtype (or quantized), the checkpoint's pages are
    mapped and resident; loaded as stored, the mapped pages are the weights themselves. CUDA: one
    tensor in flight, the largest (wte or lm_head)."""
    shape = setup.shape
    if setup.device_kind == "cuda":
        return shape.embedding_parameters * PRECISION_BYTES[setup.stored_precision]
    if setup.quantization == "gptq":
        return 0
    converted = setup.quantization == "nf4" or setup.stored_precision != setup.weight_precision
    return shape.total_parameters * PRECISION_BYTES[setup.stored_precision] if converted else 0


# ------------------------------------------------------------------------------------------ estimate


def estimate_memory(setup: TrainingSetup) -> MemoryEstimate:
    activations = estimate_activations(setup)
    weights = base_weight_bytes(setup) + _zero3_share(setup, adapter_and_copy_bytes(setup))
    autocast = autocast_copy_bytes(setup)
    gradients = gradient_bytes(setup)
    states, offloaded_states = optimizer_state_bytes(setup)
    activation_bytes = activations.for_setup(setup)
    loss = loss_buffer_bytes(setup)
    fused_gradient = fused_weight_gradient_bytes(setup)
    buffers = deepspeed_buffer_bytes(setup)
    retention = heap_retention_bytes(setup, activations)
    runtime = runtime_bytes(setup)
    reference = reference_model_bytes(setup)
    weights += reference
    offloaded_params = offloaded_parameter_bytes(setup)
    if offloaded_params:
        weights -= offloaded_params

    checkpointing = "with" if setup.gradient_checkpointing else "without"
    other = "without" if setup.gradient_checkpointing else "with"
    other_bytes = (
        activations.without_checkpointing if setup.gradient_checkpointing else activations.with_checkpointing
    )
    components = [
        Component("weights", "weights", weights, _weights_note(setup)),
        Component("autocast", "autocast weight copies", autocast, "half-precision copies kept for backward"),
        Component("gradients", "gradients", gradients, _partition_note(setup, 2)),
        Component("optimizer", "optimizer states", states, _optimizer_note(setup)),
        Component(
            "activations",
            "activations",
            activation_bytes,
            f"{checkpointing} gradient checkpointing ({other}: {other_bytes / 1e9:.2f} GB)",
        ),
        Component("loss", "loss buffers", loss + fused_gradient, _loss_note(setup, fused_gradient)),
        Component("deepspeed", "deepspeed buffers", buffers, _buffers_note(setup)),
        Component("retention", "heap retention", retention, "freed tensors glibc keeps resident"),
        Component("runtime", "runtime", runtime, _runtime_note(setup)),
    ]
    components = [part for part in components if part.bytes or part.key in ("weights", "activations")]

    # Gradients that exist while a micro-batch runs forward: those accumulated by the previous ones
    # (HF sets them to None after each optimizer step), or ZeRO-2/3's partition buffers.
    kept_gradients = gradients if setup.accumulation > 1 or setup.zero_stage >= 2 else 0
    kept_loss = kept_loss_buffer_bytes(setup)
    resident = runtime + weights + autocast + states + buffers + retention + kept_loss
    # Backward starts with every activation alive and the output layer's gradient formed first (the
    # fused loss hands out a scaled copy of the one it holds; the checkpointed loss recomputes its
    # chunks); it ends with every gradient formed and the activations released.
    output_gradient = _output_layer_gradient_bytes(setup)
    recomputed_loss = 0 if fused_loss_applies(setup) or setup.loss == "full_logits" else loss
    backward_start = kept_gradients + activation_bytes + fused_gradient + output_gradient + recomputed_loss
    phases = {
        "loading": runtime + weights + loading_transient_bytes(setup),
        "forward": resident + kept_gradients + activation_bytes + loss - kept_loss + fused_gradient,
        "backward": resident + max(backward_start, gradients),
        "optimizer step": resident - autocast + gradients + optimizer_step_bytes(setup),
    }
    processes = setup.processes_per_node
    host = [
        Component("offload", "offloaded optimizer states", offloaded_states * processes, "per node"),
        Component("offload", "offloaded parameters", offloaded_params * processes, "per node"),
    ]
    host = [part for part in host if part.bytes]
    return MemoryEstimate(components, phases, host, activations)


def _weights_note(setup: TrainingSetup) -> str:
    if setup.quantization == "nf4":
        base = "NF4 blocks, float32 embeddings and norms"
    elif setup.quantization == "gptq":
        base = f"GPTQ {setup.quant_bits}-bit blocks (group {setup.quant_group_size})"
    else:
        base = f"{setup.weight_precision if setup.zero is None else setup.compute_precision} weights"
    if setup.zero_stage == 3:
        base += f", 1/{setup.world_size} per process (ZeRO-3)"
    if setup.adapter is not None:
        base += f" + LoRA r={setup.adapter.rank}"
        if setup.embeddings_trained:
            base += " + trainable wte/lm_head copies"
    if reference_model_bytes(setup):
        base += " + the reference model"
    return base


def _partition_note(setup: TrainingSetup, stage: int) -> str:
    if setup.zero_stage >= stage:
        return f"1/{setup.world_size} per process (ZeRO-{setup.zero_stage})"
    count = trainable_parameters(setup)
    return (
        f"{count / 1e9:.2f}B trainable parameters"
        if count >= 1e9
        else f"{count / 1e6:.1f}M trainable parameters"
    )


def _optimizer_note(setup: TrainingSetup) -> str:
    if setup.zero is not None:
        where = "offloaded to CPU" if setup.zero.offload_optimizer else "on the device"
        share = f", 1/{setup.world_size} per process" if setup.zero_stage >= 1 else ""
        return f"DeepSpeed: float32 master + Adam moments{share}, {where}"
    if _known_optimizer_family(setup.optimizer) is None:
        return f"{setup.optimizer}: not known to the plan, counted as AdamW"
    return setup.optimizer


def _loss_note(setup: TrainingSetup, fused_gradient: int) -> str:
    if setup.loss == "full_logits":
        return f"full logits of {setup.positions_per_micro_batch} positions (the original recipe)"
    note = "one chunk of float32 logits"
    if fused_gradient:
        note += " + lm_head's gradient formed in the forward pass"
    return note


def _buffers_note(setup: TrainingSetup) -> str:
    if setup.zero is None:
        return ""
    if setup.zero_stage == 3:
        return "gradient bucket + gathered parameters"
    return "gradient buckets"


def _runtime_note(setup: TrainingSetup) -> str:
    if setup.device_kind == "cuda":
        return "CUDA context and kernels"
    return "the process: Python, libraries, tokenizer, data"

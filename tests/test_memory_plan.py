"""The memory and time plan: its components from first principles, every option, the suggestions, and
the plan of a real tiny run against that run's measured peak RSS; the released shapes of qwen_model.tiny."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from model_helpers import micro_config

from qwen_finetune.args import parse_args
from qwen_finetune.errors import ArgumentError
from qwen_finetune.memory_plan import (
    AdapterShape,
    ModelShape,
    PreferenceSetup,
    TrainingSetup,
    ZeroSetup,
    device_by_name,
    fits,
    plan_run,
    plan_setup,
)
from qwen_finetune.memory_plan.activations import (
    block_bytes_per_token,
    estimate_activations,
    heap_retention_bytes,
)
from qwen_finetune.memory_plan.memory import (
    NF4_BYTES_PER_WEIGHT,
    base_weight_bytes,
    estimate_memory,
    optimizer_step_bytes,
    trainable_parameters,
)
from qwen_finetune.memory_plan.step_time import flops_per_token
from qwen_model.configuration_qwen import QWenConfig
from qwen_model.modeling_qwen import QWenLMHeadModel
from qwen_model.tiny import tiny_config, write_random_weights

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO_ROOT / "bench"
DEEPSPEED_CONFIGS = REPO_ROOT / "finetune"
GB = 1e9
MEASURED_TOLERANCE = 0.15  # bench/plan_vs_measured.py's target
A100 = device_by_name("cuda", "NVIDIA A100-SXM4-80GB", 80 * 10**9, "bf16")


def meta_parameter_count(config: QWenConfig) -> int:
    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    return sum(parameter.numel() for parameter in model.parameters())


def small_config(layers: int = 2, vocab: int = 1000) -> QWenConfig:
    return micro_config(vocab, hidden=64, intermediate=256, layers=layers, positions=512)


def setup_for(config: QWenConfig, **fields: Any) -> TrainingSetup:
    return TrainingSetup(shape=ModelShape.from_config(config.to_dict()), **fields)


LORA = AdapterShape(rank=8, targets=("c_attn", "c_proj", "w1", "w2"))


# ------------------------------------------------------------------------- parameters and weights


@pytest.mark.parametrize("size", ["tiny", "small", "qwen-1.8b", "qwen-7b", "qwen-14b", "qwen-72b"])
def test_parameter_count_is_the_models(size: str) -> None:
    config = tiny_config(size)
    shape = ModelShape.from_config(config.to_dict())
    assert shape.total_parameters == meta_parameter_count(config)


def test_weights_are_parameter_count_times_dtype_size() -> None:
    config = tiny_config("tiny")
    count = meta_parameter_count(config)
    for precision, size in (("fp32", 4), ("bf16", 2)):
        full = setup_for(config, method="full", weight_precision=precision)
        assert base_weight_bytes(full) == count * size
        lora = setup_for(
            config, method="lora", adapter=LORA, weight_precision=precision, compute_precision=precision
        )
        assert base_weight_bytes(lora) == count * size


def test_nf4_quantizes_only_the_block_matrices() -> None:
    config = tiny_config("small")
    shape = ModelShape.from_config(config.to_dict())
    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    matrices = sum(p.numel() for name, p in model.named_parameters() if ".h." in name and p.dim() == 2)
    assert shape.block_linear_weights == matrices
    nf4 = setup_for(config, method="qlora", quantization="nf4", adapter=LORA)
    expected = matrices * NF4_BYTES_PER_WEIGHT + (meta_parameter_count(config) - matrices) * 4
    assert base_weight_bytes(nf4) == pytest.approx(expected, abs=1)


@pytest.mark.parametrize(
    ("targets", "bias", "dora", "embeddings"),
    [
        (("c_attn", "c_proj", "w1", "w2"), "none", False, False),
        (("c_attn",), "all", False, False),
        (("attn.c_proj", "w2"), "lora_only", False, False),
        (("c_attn", "w1"), "lora_only", True, False),
        (("c_attn", "c_proj", "w1", "w2"), "none", False, True),
    ],
)
def test_trainable_parameters_are_what_peft_builds(
    targets: tuple[str, ...], bias: str, dora: bool, embeddings: bool
) -> None:
    from peft import LoraConfig, get_peft_model

    config = small_config()
    torch.manual_seed(0)
    model = get_peft_model(
        QWenLMHeadModel(config),
        LoraConfig(
            r=8,
            target_modules=list(targets),
            bias=bias,
            use_dora=dora,
            modules_to_save=["wte", "lm_head"] if embeddings else None,
        ),
    )
    peft_trainable, _ = model.get_nb_trainable_parameters()
    adapter = AdapterShape(rank=8, targets=targets, bias=bias, dora=dora)
    setup = setup_for(config, method="lora", adapter=adapter, train_embeddings=embeddings)
    assert trainable_parameters(setup) == peft_trainable
    states = estimate_memory(setup).component("optimizer")
    element = (
        4 if not embeddings else (4 * adapter.parameters(setup.shape) + 4 * 2 * 64 * 1000) / peft_trainable
    )
    assert states == pytest.approx(2 * peft_trainable * element, rel=1e-9)  # AdamW: two moments


# ------------------------------------------------------------------------------- ZeRO partitioning


def test_zero3_divides_weights_gradients_and_optimizer_states_by_world_size() -> None:
    config = tiny_config("qwen-7b")
    zero = ZeroSetup.from_config(json.loads((DEEPSPEED_CONFIGS / "ds_config_zero3.json").read_text()), 4096)
    alone = estimate_memory(
        setup_for(config, method="full", compute_precision="bf16", zero=zero, world_size=1)
    )
    shared = estimate_memory(
        setup_for(config, method="full", compute_precision="bf16", zero=zero, world_size=8)
    )
    for key in ("weights", "gradients", "optimizer"):
        assert shared.component(key) == pytest.approx(alone.component(key) / 8, abs=8)
    parameters = meta_parameter_count(config)
    assert alone.component("weights") == 2 * parameters  # DeepSpeed casts the model to bf16
    assert alone.component("optimizer") == 12 * parameters  # float32 master + two float32 moments
    assert alone.component("deepspeed") > 0


def test_zero2_partitions_gradients_and_states_but_not_weights() -> None:
    config = tiny_config("qwen-1.8b")
    zero = ZeroSetup.from_config(json.loads((DEEPSPEED_CONFIGS / "ds_config_zero2.json").read_text()), 2048)
    assert zero.stage == 2 and zero.overlap_comm and zero.reduce_bucket_elements == 200_000_000
    one, four = (
        estimate_memory(setup_for(config, method="full", compute_precision="bf16", zero=zero, world_size=n))
        for n in (1, 4)
    )
    assert four.component("weights") == one.component("weights")
    assert four.component("gradients") == pytest.approx(one.component("gradients") / 4, abs=4)
    assert four.component("optimizer") == pytest.approx(one.component("optimizer") / 4, abs=4)
    assert one.component("deepspeed") == 2 * 200_000_000 * 2  # two bf16 buckets (overlap_comm)


def test_offload_moves_optimizer_states_to_host_memory() -> None:
    config = tiny_config("qwen-7b")
    raw = json.loads((DEEPSPEED_CONFIGS / "ds_config_zero3_offload.json").read_text())
    zero = ZeroSetup.from_config(raw, 4096)
    assert zero.offload_optimizer and zero.offload_params
    plan = estimate_memory(
        setup_for(
            config, method="full", compute_precision="bf16", zero=zero, world_size=4, processes_per_node=4
        )
    )
    parameters = meta_parameter_count(config)
    assert plan.component("optimizer") == 0
    host = {part.label: part.bytes for part in plan.host}
    assert host["offloaded optimizer states"] == pytest.approx(12 * parameters, abs=64)  # 4 processes x 1/4
    assert host["offloaded parameters"] == pytest.approx(2 * parameters, abs=64)


# ------------------------------------------------------------------------------------- activations


def saved_for_backward_bytes(model: torch.nn.Module, **inputs: torch.Tensor) -> int:
    """Bytes of every storage autograd saves in one training forward (parameters excluded)."""
    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(**inputs, skip_logits=True)  # as the toolkit's trainer calls it: the chunked loss
    return sum(storages.values())


def training_model(layers: int, dtype: torch.dtype, method: str, dropout: float) -> torch.nn.Module:
    config = small_config(layers)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model: torch.nn.Module = QWenLMHeadModel(config).to(dtype)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        from qwen_finetune.lora_dropout import use_sampled_lora_dropout

        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=list(LORA.targets))
        model = get_peft_model(model, lora)
        use_sampled_lora_dropout(model)  # as model_loading does on the CPU
    return model.train()


@pytest.mark.parametrize(("method", "dropout"), [("full", 0.0), ("lora", 0.05), ("lora", 0.0)])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("packing", [False, True])
def test_block_activations_are_what_autograd_saves(
    method: str, precision: str, packing: bool, dropout: float
) -> None:
    """Per block and token, the formula equals the bytes autograd keeps (difference of 3 and 2 blocks)."""
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    tokens = 128
    input_ids = torch.randint(0, 1000, (1, tokens), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": input_ids, "labels": input_ids}
    if packing:
        inputs["position_ids"] = torch.cat([torch.arange(48), torch.arange(80)])[None]
    saved = [saved_for_backward_bytes(training_model(n, dtype, method, dropout), **inputs) for n in (2, 3)]
    setup = setup_for(
        small_config(),
        method=method,
        adapter=LORA if method == "lora" else None,
        lora_dropout=dropout,
        weight_precision=precision,
        compute_precision=precision,
        packing=packing,
        max_length=tokens,
    )
    assert saved[1] - saved[0] == tokens * block_bytes_per_token(setup)


@pytest.mark.parametrize("method", ["full", "lora"])
def test_whole_forward_activations_match_autograd(method: str) -> None:
    """All of one forward: blocks, the first block's saving, rotary tables, ln_f and the loss's
    saved features (and, for full fine-tuning, the fused loss's lm_head gradient)."""
    tokens = 128
    input_ids = torch.randint(0, 1000, (1, tokens), generator=torch.Generator().manual_seed(0))
    saved = saved_for_backward_bytes(
        training_model(3, torch.float32, method, 0.05), input_ids=input_ids, labels=input_ids
    )
    setup = setup_for(
        small_config(3), method=method, adapter=LORA if method == "lora" else None, max_length=tokens
    )
    planned = estimate_activations(setup).without_checkpointing
    if method == "full":
        planned += setup.shape.embedding_parameters * 4  # the fused loss keeps lm_head's gradient
    assert planned == pytest.approx(saved, rel=0.01)


def test_gradient_checkpointing_keeps_a_fraction_of_the_activations() -> None:
    config = tiny_config("qwen-7b")
    setup = setup_for(
        config,
        method="lora",
        adapter=LORA,
        compute_precision="bf16",
        weight_precision="bf16",
        max_length=2048,
    )
    activations = estimate_activations(setup)
    checkpoints = config.num_hidden_layers * 2048 * 2 * config.hidden_size
    assert activations.with_checkpointing >= checkpoints
    assert activations.with_checkpointing < activations.without_checkpointing / 10


def test_every_n_layers_leaves_the_planned_blocks_uncheckpointed() -> None:
    """transformers' partial checkpointing (`every_n_layers`, as the Trainer passes it on): the blocks it
    leaves out save everything a block saves without checkpointing, which the plan counts in place of
    their checkpointed input; the FLOPs recomputed shrink by the same share."""
    layers, tokens = 5, 128
    input_ids = torch.randint(0, 1000, (1, tokens), generator=torch.Generator().manual_seed(0))
    saved: dict[int, int] = {}
    checkpointed: dict[int, int] = {}
    for every in (1, 2):
        model = training_model(layers, torch.float32, "lora", 0.05)
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}, every_n_layers=every
        )
        checkpointed[every] = sum(
            block.gradient_checkpointing for block in model.base_model.model.transformer.h
        )
        saved[every] = saved_for_backward_bytes(model, input_ids=input_ids, labels=input_ids)
    setups = {
        every: setup_for(
            small_config(layers),
            method="lora",
            adapter=LORA,
            max_length=tokens,
            gradient_checkpointing=True,
            checkpoint_every=every,
        )
        for every in (1, 2)
    }
    assert (
        {every: setup.checkpointed_layers for every, setup in setups.items()} == checkpointed == {1: 5, 2: 3}
    )
    left_out = checkpointed[1] - checkpointed[2]
    planned = {every: estimate_activations(setup).with_checkpointing for every, setup in setups.items()}
    checkpoint_input = tokens * 4 * setups[1].shape.hidden
    assert planned[2] - planned[1] == left_out * (
        tokens * block_bytes_per_token(setups[1]) - checkpoint_input
    )
    # The hooks also see the checkpointed blocks' inputs; what they miss with every block checkpointed
    # are the rotary tables (float32 cos and sin), which the plan counts once in either case.
    rotary_tables = tokens * 2 * 4 * setups[1].shape.rotary_dim
    assert saved[2] - saved[1] == planned[2] - planned[1] + rotary_tables
    model_flops, full_recompute = flops_per_token(setups[1])
    _, partial_recompute = flops_per_token(setups[2])
    assert partial_recompute - model_flops == pytest.approx((full_recompute - model_flops) * 3 / 5)


def test_every_n_layers_must_be_a_positive_whole_number(tmp_path: Path) -> None:
    for value in ("0", "-2", '"two"', "1.5"):
        with pytest.raises(ArgumentError, match="every_n_layers"):
            parse_args(
                [
                    *("--model_name_or_path", str(tmp_path), "--data_path", "d.json"),
                    *("--output_dir", str(tmp_path / "out"), "--gradient_checkpointing"),
                    *("--gradient_checkpointing_kwargs", f'{{"every_n_layers": {value}}}'),
                ]
            )


def test_heap_retention_with_checkpointing_is_one_block_of_heap_sized_tensors_per_layer() -> None:
    """On CPU a checkpointed run leaves, per layer, the holes of the block tensors glibc keeps in its
    heap (below 32 MiB); the MLP outputs and the fused qkv of the 1.8B shape at 2048 are mapped."""
    config = tiny_config("qwen-1.8b")
    layers, h, m = config.num_hidden_layers, config.hidden_size, config.intermediate_size // 2

    def setup(
        length: int, checkpointing: bool = True, device: str = "cpu", keep: bool = False
    ) -> TrainingSetup:
        return setup_for(
            config,
            method="lora",
            adapter=LORA,
            max_length=length,
            gradient_checkpointing=checkpointing,
            device_kind=device,
            keeps_freed_memory=keep,
        )

    short = setup(128)
    assert heap_retention_bytes(short, estimate_activations(short)) == layers * 128 * block_bytes_per_token(
        short
    )
    long = setup(2048)
    # mapped: w1, w2, silu(w2) and mlp.c_proj's dropout output (m wide), the qkv output (3h wide); the
    # dropout's byte mask in front of mlp.c_proj (m bytes per position, 11 MB) stays in the heap
    mapped = 4 * 4 * m + 3 * 4 * h
    expected = layers * 2048 * (block_bytes_per_token(long) - mapped)
    assert heap_retention_bytes(long, estimate_activations(long)) == expected
    # glibc keeping freed memory serves the mapped ones from the heap too: one block of them in use, and
    # per layer a hole the size of the largest (the qkv output)
    kept = setup(2048, keep=True)
    largest = 3 * 4 * h
    assert heap_retention_bytes(kept, estimate_activations(kept)) == expected + 2048 * (
        mapped + layers * largest
    )
    # nothing is mapped at 128 positions: keeping changes nothing there
    short_kept = setup(128, keep=True)
    assert heap_retention_bytes(short_kept, estimate_activations(short_kept)) == heap_retention_bytes(
        short, estimate_activations(short)
    )
    plain = setup(2048, checkpointing=False)
    assert (
        heap_retention_bytes(plain, estimate_activations(plain))
        == estimate_activations(plain).without_checkpointing
    )
    gpu = setup(2048, device="cuda")
    assert heap_retention_bytes(gpu, estimate_activations(gpu)) == 0


_OPTIMIZER_STEP_SCRIPT = """
import sys, tempfile, torch
from transformers import Trainer, TrainingArguments
from qwen_finetune.run_metrics import peak_rss_bytes
args = TrainingArguments(output_dir=tempfile.mkdtemp(), optim=sys.argv[1], use_cpu=True, report_to="none")
optimizer_class, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
parameter = torch.nn.Parameter(torch.randn(int(sys.argv[2])))
parameter.grad = torch.randn_like(parameter)
optimizer = optimizer_class([parameter], **kwargs)
optimizer.step()  # the moments exist from here on
open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from the current RSS
before = peak_rss_bytes()
optimizer.step()
print(peak_rss_bytes() - before)
"""


@pytest.mark.parametrize("optimizer", ["adamw_torch", "adamw_torch_fused"])
def test_optimizer_step_temporaries_are_what_the_trainers_adamw_allocates(optimizer: str) -> None:
    """The plan's step temporaries against a step of the optimizer transformers builds for --optim, on a
    64 MiB parameter: the loop keeps the square root and the quotient (two copies), the fused one none."""
    import subprocess

    setup = setup_for(small_config(vocab=2**18), method="full", optimizer=optimizer)
    elements = setup.shape.embedding_parameters
    completed = subprocess.run(
        [sys.executable, "-c", _OPTIMIZER_STEP_SCRIPT, optimizer, str(elements)],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    measured = int(completed.stdout.strip().splitlines()[-1])
    assert measured == pytest.approx(optimizer_step_bytes(setup), abs=8 * 2**20)  # measured: 128 MiB / 0


# --------------------------------------------------------------------------------- every option


def _plan_flags(checkpoint: Path, tmp_path: Path, extra: list[str]) -> list[str]:
    return [
        "--model_name_or_path",
        str(checkpoint),
        "--output_dir",
        str(tmp_path / "out"),
        "--model_max_length",
        "512",
        "--use_cpu",
        *extra,
    ]


CPU = device_by_name("cpu", "CPU", 24 * 10**9, "fp32")


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--use_lora"],
        ["--use_lora", "--train_embeddings", "yes"],
        ["--use_lora", "--q_lora", "--q_lora_backend", "nf4"],
        ["--use_lora", "--bf16", "true", "--packing"],
        ["--fp16", "true", "--gradient_checkpointing", "--per_device_train_batch_size", "4"],
        ["--use_lora", "--gradient_accumulation_steps", "8", "--lora_r", "16", "--use_dora"],
        ["--use_lora", "--pad_to_max_length", "--per_device_train_batch_size", "2"],
    ],
)
def test_every_mode_and_option_plans(tiny_chat_checkpoint: Path, tmp_path: Path, extra: list[str]) -> None:
    model_args, data_args, training_args, lora_args = parse_args(
        _plan_flags(tiny_chat_checkpoint, tmp_path, extra)
    )
    for world_size in (1, 4):
        plan = plan_run(model_args, data_args, training_args, lora_args, world_size=world_size, device=CPU)
        assert plan.peak_bytes > plan.memory.component("weights") > 0
        assert "total (peak" in plan.table() and plan.one_line().startswith("plan: peak")
        written = json.loads(json.dumps(plan.to_json()))
        assert written["total_bytes"] == plan.peak_bytes
        assert sum(written["components"].values()) >= plan.peak_bytes - max(plan.memory.phases.values())


def test_gptq_checkpoint_plans_from_its_quantization_config(
    tiny_chat_checkpoint: Path, tmp_path: Path
) -> None:
    """A GPTQ checkpoint (config.json with quantization_config) plans as Q-LoRA at its bits."""
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    config = json.loads((tiny_chat_checkpoint / "config.json").read_text())
    for bits in (4, 8):
        config["quantization_config"] = {"quant_method": "gptq", "bits": bits, "group_size": 32}
        (gptq / "config.json").write_text(json.dumps(config))
        args = parse_args(_plan_flags(gptq, tmp_path, ["--use_lora", "--q_lora"]))
        plan = plan_run(*args, world_size=1, device=CPU)
        assert plan.setup.quantization == "gptq" and plan.setup.quant_bits == bits
    assert "GPTQ 8-bit" in plan.table()


def test_deepspeed_and_precision_variants_plan() -> None:
    config = tiny_config("qwen-1.8b")
    for name in (
        "ds_config_zero2.json",
        "ds_config_zero2_offload.json",
        "ds_config_zero3.json",
        "ds_config_zero3_offload.json",
    ):
        zero = ZeroSetup.from_config(json.loads((DEEPSPEED_CONFIGS / name).read_text()), config.hidden_size)
        for precision in ("bf16", "fp16", "fp32"):
            for method, adapter in (("full", None), ("lora", LORA)):
                setup = setup_for(
                    config,
                    method=method,
                    adapter=adapter,
                    compute_precision=precision,
                    zero=zero,
                    world_size=2,
                    device_kind="cuda",
                )
                plan = plan_setup(setup, A100)
                assert plan.peak_bytes > 0 and plan.time.expected_seconds is not None


def test_preference_pairs_double_the_rows_and_a_reference_copy_adds_weights() -> None:
    config = tiny_config("qwen-1.8b")
    sft = setup_for(config, method="full", compute_precision="bf16", device_kind="cuda")
    two_rows = sft.with_changes(micro_batch=2)
    precomputed_reference = sft.with_changes(preference=PreferenceSetup("precomputed"))
    copy = sft.with_changes(preference=PreferenceSetup("frozen_copy"))
    assert estimate_activations(precomputed_reference).per_layer == estimate_activations(two_rows).per_layer
    extra = estimate_memory(copy).component("weights") - estimate_memory(precomputed_reference).component(
        "weights"
    )
    assert extra == 2 * meta_parameter_count(config)
    assert (
        plan_setup(copy, A100).time.executed_flops
        > plan_setup(precomputed_reference, A100).time.executed_flops
    )


# --------------------------------------------------------------------------------- suggestions


def test_suggestions_fit_below_the_limit() -> None:
    setup = setup_for(
        tiny_config("qwen-7b"), method="full", compute_precision="bf16", max_length=2048, device_kind="cuda"
    )
    plan = plan_setup(setup, device_by_name("cuda", "NVIDIA A10G", 24 * 10**9, "bf16"))
    assert not plan.fits_device
    suggestions = fits(plan, plan.device.memory_bytes)
    assert suggestions
    for suggestion in suggestions:
        assert suggestion.device_total_bytes <= plan.device.memory_bytes
        assert estimate_memory(suggestion.setup).peak == suggestion.peak_bytes
    assert "changes that would fit" in plan.table()
    warning = plan.warning()
    assert warning is not None and "short" in warning and suggestions[0].change in warning
    fitting = plan_setup(suggestions[0].setup, plan.device)
    assert fitting.fits_device and fitting.warning() is None


def test_each_single_change_that_fits_is_listed() -> None:
    setup = setup_for(
        tiny_config("qwen-1.8b"), method="lora", adapter=LORA, max_length=4096, device_kind="cuda"
    )
    plan = plan_setup(setup, A100)
    limit = int(plan.peak_bytes * 0.9)
    suggestions = fits(plan, limit)
    assert any("--gradient_checkpointing" in s.flags for s in suggestions)
    assert all(s.peak_bytes <= limit for s in suggestions)
    assert fits(plan, plan.peak_bytes) == []  # it fits: nothing to change


def test_a_cpu_run_that_keeps_freed_memory_is_offered_to_give_it_back() -> None:
    setup = setup_for(
        tiny_config("qwen-1.8b"),
        method="lora",
        adapter=LORA,
        max_length=2048,
        gradient_checkpointing=True,
        keeps_freed_memory=True,
    )
    plan = plan_setup(setup, CPU)
    suggestions = fits(plan, plan.peak_bytes - 1)
    change = next(s for s in suggestions if s.flags == ("--keep_freed_memory", "no"))
    assert not change.setup.keeps_freed_memory
    assert change.peak_bytes < plan.peak_bytes


# ------------------------------------------------------------------------------------------ time


def test_step_time_follows_the_flops_and_the_peak() -> None:
    setup = setup_for(
        tiny_config("qwen-7b"),
        method="lora",
        adapter=LORA,
        compute_precision="bf16",
        max_length=2048,
        device_kind="cuda",
    )
    plan = plan_setup(setup, A100)
    assert plan.time.seconds_at_peak == pytest.approx(plan.time.executed_flops / 312e12)
    checkpointed = plan_setup(setup.with_changes(gradient_checkpointing=True), A100)
    assert checkpointed.time.executed_flops > plan.time.executed_flops == plan.time.model_flops
    unknown = plan_setup(setup, device_by_name("cuda", "Some Future GPU", 10**11, "bf16"))
    assert unknown.time.seconds_at_peak is None and "not in the GPU peak table" in unknown.table()


# ------------------------------------------------------------------------------ against a real run


@pytest.mark.slow
def test_tiny_plan_is_within_the_benchmark_tolerance_of_a_measured_run(
    tiny_chat_checkpoint: Path, shared_data_dir: Path, tmp_path: Path
) -> None:
    sys.path.insert(0, str(BENCH_DIR))
    from memory import run_child

    flags = _plan_flags(
        tiny_chat_checkpoint,
        tmp_path,
        [
            "--use_lora",
            "--packing",
            "--data_path",
            str(shared_data_dir / "llamafactory_alpaca_en_demo.json"),
            "--max_steps",
            "2",
            "--save_strategy",
            "no",
            "--report_to",
            "none",
            "--dataloader_num_workers",
            "0",
            "--data_cache_dir",
            str(tmp_path / "cache"),
        ],
    )
    plan = plan_run(*parse_args(flags), world_size=1, device=CPU)
    run = run_child([str(REPO_ROOT / "finetune.py"), *flags], tmp_path / "run.log")
    assert run.exit_code == 0, run.log_path.read_text()[-3000:]
    assert plan.peak_bytes == pytest.approx(run.peak_rss_bytes, rel=MEASURED_TOLERANCE)


# ----------------------------------------------------------------------------- qwen_model.tiny shapes


def test_released_shapes_have_the_official_config_fields() -> None:
    config = tiny_config("qwen-1.8b")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (2048, 24, 16)
    assert (config.intermediate_size, config.vocab_size, config.seq_length, config.kv_channels) == (
        11008,
        151936,
        8192,
        128,
    )
    assert config.bf16 and not config.fp32 and config.architectures == ["QWenLMHeadModel"]
    seven = tiny_config("qwen-7b")
    assert (
        seven.hidden_size,
        seven.num_hidden_layers,
        seven.num_attention_heads,
        seven.intermediate_size,
    ) == (
        4096,
        32,
        32,
        22016,
    )
    assert tiny_config("qwen-72b").rotary_emb_base == 1000000
    assert meta_parameter_count(config) == pytest.approx(1.84e9, rel=0.01)
    assert meta_parameter_count(seven) == pytest.approx(7.72e9, rel=0.01)


def test_streamed_weights_load_and_repeat_with_the_seed(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    config = small_config(2)
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        write_random_weights(config, tmp_path / name, seed, torch.bfloat16, max_shard_bytes=50_000)
        config.save_pretrained(tmp_path / name)
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and index["metadata"][
        "total_parameters"
    ] == meta_parameter_count(config)
    models = [AutoModelForCausalLM.from_pretrained(tmp_path / name, dtype=torch.bfloat16) for name in "abc"]
    a, b, c = (model.state_dict() for model in models)
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not torch.equal(a["transformer.wte.weight"], c["transformer.wte.weight"])
    assert a["transformer.h.0.mlp.w1.weight"].float().std().item() == pytest.approx(0.02, rel=0.1)
    assert a["transformer.h.0.mlp.c_proj.weight"].float().std().item() == pytest.approx(0.01, rel=0.1)
    assert torch.equal(a["transformer.h.0.ln_1.weight"], torch.ones(64, dtype=torch.bfloat16))


@pytest.mark.slow
def test_streamed_writing_holds_about_one_shard_in_memory(tmp_path: Path) -> None:
    """A ~270 MB model of 12 layers in 40 MB shards: the writer's peak grows by about one shard, not by
    the model. (Its largest tensor is 6 MB: with the full vocabulary a single embedding would be the size
    of four shards and no writer could stay below it.)"""
    script = (
        "import sys, torch\n"
        "from qwen_finetune.run_metrics import peak_rss_bytes\n"
        "from qwen_model.configuration_qwen import QWenConfig\n"
        "from qwen_model.tiny import write_random_weights\n"
        "config = QWenConfig(vocab_size=4096, hidden_size=1024, num_hidden_layers=12, num_attention_heads=8,"
        " kv_channels=128, intermediate_size=4096)\n"
        "before = peak_rss_bytes()\n"
        "write_random_weights(config, __import__('pathlib').Path(sys.argv[1]), 0, torch.bfloat16, 40_000_000)\n"
        "print(peak_rss_bytes() - before)\n"
    )
    import subprocess

    completed = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, check=True, timeout=300
    )
    growth = int(completed.stdout.strip().splitlines()[-1])
    total = json.loads((tmp_path / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert total > 250e6
    assert growth < 3 * 40_000_000  # measured: 46 MB

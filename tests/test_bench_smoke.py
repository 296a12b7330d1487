"""The benchmark's FLOP formulas against torch's FLOP counter, and one benchmark child run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from qwen_model.configuration_qwen import QWenConfig
from qwen_model.modeling_qwen import QWenLMHeadModel

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH_DIR))

from flops import ModelShape, StepTokens, executed_flops  # noqa: E402
from memory import RESULT_PREFIX  # noqa: E402

LORA_RANK = 4


def small_random_model() -> QWenLMHeadModel:
    config = QWenConfig(
        vocab_size=512,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        kv_channels=16,
        intermediate_size=96,
        seq_length=64,
        max_position_embeddings=64,
    )
    config._attn_implementation = "eager"  # plain matmuls, which torch's FLOP counter sees on CPU
    torch.manual_seed(0)
    return QWenLMHeadModel(config).train()


def counted_training_flops(model: torch.nn.Module, input_ids: torch.Tensor, full_logits: bool = True) -> int:
    """Matmul FLOPs of one forward+backward (full logits, or the toolkit's chunked loss), as torch counts
    them."""
    with FlopCounterMode(display=False) as counter:
        model(
            input_ids=input_ids, labels=input_ids, skip_logits=False if full_logits else None
        ).loss.backward()
    return counter.get_total_flops()


def shape_of(model: QWenLMHeadModel) -> ModelShape:
    return ModelShape.from_config(model.config.to_dict())


def full_logits_step(rows: int, length: int) -> StepTokens:
    positions = rows * length
    return StepTokens(
        real_tokens=positions,
        supervised=rows * (length - 1),
        padded_tokens=positions,
        sum_squared_segments=rows * length * length,
        sum_squared_rows=rows * length * length,
    )


def test_executed_flops_of_full_fine_tuning_match_torch_counter() -> None:
    model = small_random_model()
    input_ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    counted = counted_training_flops(model, input_ids)
    step = full_logits_step(2, 24)
    predicted = executed_flops(shape_of(model), "full", LORA_RANK, step, full_logits=True, packed=False)
    assert predicted == pytest.approx(counted, rel=0.01)


def test_executed_flops_of_the_fused_chunked_loss_match_torch_counter() -> None:
    """The fused loss projects supervised positions once (no recomputation in backward)."""
    model = small_random_model()
    input_ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    counted = counted_training_flops(model, input_ids, full_logits=False)
    step = full_logits_step(2, 24)
    predicted = executed_flops(shape_of(model), "full", LORA_RANK, step, full_logits=False, packed=False)
    assert predicted == pytest.approx(counted, rel=0.01)


def test_executed_flops_of_lora_skip_frozen_weight_gradients() -> None:
    from peft import LoraConfig, get_peft_model

    base = small_random_model()
    lora = LoraConfig(
        r=LORA_RANK, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "w1", "w2"]
    )
    model = get_peft_model(base, lora).train()
    input_ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    counted = counted_training_flops(model, input_ids)
    step = full_logits_step(2, 24)
    predicted = executed_flops(shape_of(base), "lora", LORA_RANK, step, full_logits=True, packed=False)
    assert predicted == pytest.approx(counted, rel=0.01)
    full = executed_flops(shape_of(base), "full", LORA_RANK, step, full_logits=True, packed=False)
    assert predicted < full  # frozen weights: no weight gradients


@pytest.mark.slow
def test_benchmark_child_trains_and_reports(tiny_chat_checkpoint: Path, tmp_path: Path) -> None:
    config = {"mode": "lora", "batching": "packed", "max_length": 512, "steps": 2}
    command = [
        sys.executable,
        str(BENCH_DIR / "train_once.py"),
        json.dumps(config),
        str(tiny_chat_checkpoint),
        str(tiny_chat_checkpoint),  # no GPTQ checkpoint needed for LoRA
        str(tmp_path / "work"),
        "--data_cache_dir",
        str(tmp_path / "cache"),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    tokens = result["tokens"]
    # 2 steps x 4 micro-batches of one 512-token row; the first micro-batch is the unmeasured warm-up
    assert result["measured_micro_batches"] == 7
    assert 0 < tokens["real_tokens"] <= tokens["padded_tokens"] <= 7 * 512
    assert 0 < tokens["supervised"] < tokens["real_tokens"]
    assert tokens["sum_squared_segments"] <= tokens["sum_squared_rows"]
    assert result["seconds"] > 0 and result["trainable_parameters"] < result["total_parameters"]

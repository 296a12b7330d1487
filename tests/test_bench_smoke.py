"""The benchmark's FLOP formulas against torch's FLOP counter, and one benchmark child run end to end."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_helpers import micro_config
from torch.utils.flop_counter import FlopCounterMode

from qwen_model.modeling_qwen import QWenLMHeadModel

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH_DIR))

from flops import FUSED_LOSS, ORIGINAL_LOSS, TRL_CPU_LOSS, ModelShape, StepTokens, executed_flops  # noqa: E402
from memory import RESULT_PREFIX  # noqa: E402
from portable_paths import PATH_START, repository_relative  # noqa: E402

LORA_RANK = 4


def small_random_model() -> QWenLMHeadModel:
    config = micro_config(512)
    config._attn_implementation = "eager"  # plain matmuls, which torch's FLOP counter sees on CPU
    torch.manual_seed(0)
    return QWenLMHeadModel(config).train()


def counted_training_flops(model: torch.nn.Module, input_ids: torch.Tensor, full_logits: bool = True) -> int:
    """Matmul FLOPs of one forward+backward (full logits, or the toolkit's chunked loss), as torch counts
    them."""
    with FlopCounterMode(display=False) as counter:
        model(input_ids=input_ids, labels=input_ids, skip_logits=not full_logits).loss.backward()
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
    predicted = executed_flops(shape_of(model), "full", LORA_RANK, step, ORIGINAL_LOSS, packed=False)
    assert predicted == pytest.approx(counted, rel=0.01)


def test_executed_flops_of_the_fused_chunked_loss_match_torch_counter() -> None:
    """The fused loss projects supervised positions once (no recomputation in backward)."""
    model = small_random_model()
    input_ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    counted = counted_training_flops(model, input_ids, full_logits=False)
    step = full_logits_step(2, 24)
    predicted = executed_flops(shape_of(model), "full", LORA_RANK, step, FUSED_LOSS, packed=False)
    assert predicted == pytest.approx(counted, rel=0.01)


def test_executed_flops_of_lora_skip_frozen_weight_gradients() -> None:
    base = small_random_model()
    model = lora_model(base)
    input_ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    counted = counted_training_flops(model, input_ids)
    step = full_logits_step(2, 24)
    predicted = executed_flops(shape_of(base), "lora", LORA_RANK, step, ORIGINAL_LOSS, packed=False)
    assert predicted == pytest.approx(counted, rel=0.01)
    full = executed_flops(shape_of(base), "full", LORA_RANK, step, ORIGINAL_LOSS, packed=False)
    assert predicted < full  # frozen weights: no weight gradients


def lora_model(base: QWenLMHeadModel, modules_to_save: list[str] | None = None) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=LORA_RANK,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=["c_attn", "c_proj", "w1", "w2"],
        modules_to_save=modules_to_save,
    )
    return get_peft_model(base, lora).train()


def test_executed_flops_of_lora_with_trainable_embeddings_use_the_fused_loss() -> None:
    """PEFT's wrapped lm_head takes the fused loss: projected once, with its weight gradient."""
    model = lora_model(small_random_model(), modules_to_save=["wte", "lm_head"])
    input_ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    counted = counted_training_flops(model, input_ids, full_logits=False)
    step = full_logits_step(2, 24)
    shape = shape_of(model.get_base_model())
    predicted = executed_flops(shape, "lora_emb", LORA_RANK, step, FUSED_LOSS, packed=False)
    assert predicted == pytest.approx(counted, rel=0.01)


def addmm_flops(
    self_shape: torch.Size, first: torch.Size, second: torch.Size, *args: object, **kwargs: object
) -> int:
    return 2 * first[0] * first[1] * second[1]


def test_executed_flops_of_trl_loss_on_cpu_project_every_position_twice() -> None:
    """TRL's fused LM head (what its SFTTrainer trains with) on CPU: every position, recomputed in backward."""
    from trl.trainer.utils import add_fused_lm_head

    base = small_random_model()
    add_fused_lm_head(base)
    model = lora_model(base)
    rows, width = 2, 24
    input_ids = torch.randint(0, 512, (rows, width), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, :10] = -100  # unsupervised positions are projected all the same
    # TRL accumulates the input gradient with the in-place addmm_, which the counter does not map by itself
    in_place_addmm = {torch.ops.aten.addmm_: addmm_flops}
    with FlopCounterMode(display=False, custom_mapping=in_place_addmm) as counter:
        model(input_ids=input_ids, labels=labels, fused_lm_head=True).loss.backward()
    shape = shape_of(base)
    predicted = executed_flops(
        shape, "lora", LORA_RANK, full_logits_step(rows, width), TRL_CPU_LOSS, packed=False
    )
    predicted -= 6 * shape.output_weights * rows  # the last position of a row predicts nothing: not projected
    assert predicted == pytest.approx(counter.get_total_flops(), rel=0.01)


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


@pytest.mark.slow
def test_trl_peer_child_trains_and_reports(tiny_chat_checkpoint: Path, tmp_path: Path) -> None:
    config = {"mode": "lora", "batching": "packed", "max_length": 2048, "steps": 2, "trainer": "trl"}
    command = [
        sys.executable,
        str(BENCH_DIR / "trl_once.py"),
        json.dumps(config),
        str(tiny_chat_checkpoint),
        str(tmp_path / "work"),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    tokens = result["tokens"]
    # 2 steps of one packed, padding-free row of at most 2048 tokens; the first is the warm-up
    assert result["measured_micro_batches"] == 1
    assert 0 < tokens["real_tokens"] == tokens["padded_tokens"] <= 2048
    assert 0 < tokens["supervised"] < tokens["real_tokens"]
    assert tokens["sum_squared_segments"] < tokens["sum_squared_rows"]  # several samples in the row
    assert result["trl_arguments"]["packing_strategy"] == "bfd"
    assert result["trainable_parameters"] < result["total_parameters"]


def test_batch_records_count_real_supervised_and_packed_tokens() -> None:
    """The same figures for the toolkit's packed rows (padded at the end), padding-free rows and padded rows."""
    from measure import batch_tokens

    from qwen_finetune.data.collate import SupervisedCollator

    samples = [
        {"input_ids": [5] * 7, "labels": [-100] * 3 + [5] * 4, "position_ids": [*range(3), *range(4)]},
        {"input_ids": [6] * 4, "labels": [-100, 6, 6, 6], "position_ids": list(range(4))},
    ]
    packed = batch_tokens(SupervisedCollator(pad_token_id=0)(samples))
    assert (packed.real_tokens, packed.padded_tokens) == (11, 14)
    assert packed.sum_squared_segments == 3 * 3 + 4 * 4 + 4 * 4  # the padding is no sample
    assert packed.supervised == 4 + 3
    padding_free = {
        "input_ids": torch.ones(1, 9, dtype=torch.long),
        "labels": torch.tensor([[-100, 1, 1, -100, -100, 1, 1, 1, 1]]),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5]]),
    }
    free = batch_tokens(padding_free)
    assert (free.real_tokens, free.padded_tokens, free.sum_squared_segments, free.supervised) == (9, 9, 45, 6)
    plain = [{"input_ids": [5] * 3, "labels": [5] * 3}, {"input_ids": [6] * 5, "labels": [6] * 5}]
    padded = batch_tokens(SupervisedCollator(pad_token_id=0, pad_to_length=8)(plain))
    assert (padded.real_tokens, padded.padded_tokens, padded.sum_squared_segments) == (8, 16, 34)
    assert padded.sum_squared_rows == 2 * 8 * 8


def test_peer_dataset_renders_conversations_and_tool_calls(shared_data_dir: Path, vocab_file: Path) -> None:
    """The peers' messages rows go through the tokenizer's chat template: tool lists, calls and results
    come out as Qwen's ReAct text, plain conversations as ChatML turns."""
    from peer_data import messages_rows

    from qwen_model.tokenization_qwen import QWenTokenizer

    tokenizer = QWenTokenizer(vocab_file)
    rows = messages_rows([shared_data_dir / "llamafactory_glaive_toolcall_en_demo.json"])
    with_calls = next(row for row in rows if any("tool_calls" in message for message in row["messages"]))
    tools = json.loads(with_calls["tools"])
    call = next(message for message in with_calls["messages"] if "tool_calls" in message)["tool_calls"][0]
    result = next(message for message in with_calls["messages"] if message["role"] == "tool")
    text = tokenizer.apply_chat_template(with_calls["messages"], tools=tools, tokenize=False)
    assert f"Action: {call['function']['name']}\nAction Input: {call['function']['arguments']}" in text
    assert f"Observation: {result['content'].lstrip(chr(10)).rstrip()}" in text
    assert tools[0]["name"] in text.split("Question:")[0]

    alpaca = messages_rows([shared_data_dir / "llamafactory_alpaca_en_demo.json"])[0]["messages"]
    assert [message["role"] for message in alpaca] == ["user", "assistant"]
    rendered = tokenizer.apply_chat_template(alpaca, tokenize=False)
    assert rendered.endswith(f"<|im_start|>assistant\n{alpaca[1]['content']}<|im_end|>\n")


def test_reference_pass_flops_are_a_forward_without_gradients() -> None:
    """DPO's reference pass: the chunked loss without gradients projects the supervised positions once."""
    from flops import reference_forward_flops

    model = small_random_model()
    rows, width = 2, 24
    input_ids = torch.randint(0, 512, (rows, width), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, :9] = -100
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(input_ids=input_ids, labels=labels, skip_logits=True)
    shape = shape_of(model)
    step = full_logits_step(rows, width)
    masked_attention = 2 * 6 * shape.layers * shape.attention_width * step.sum_squared_rows  # eager: W^2
    supervised = int((labels[:, 1:] != -100).sum())
    predicted = reference_forward_flops(shape, step, supervised, masked_attention)
    assert predicted == pytest.approx(counter.get_total_flops(), rel=0.01)


@pytest.mark.slow
def test_dpo_child_trains_and_reports(tiny_chat_checkpoint: Path, tmp_path: Path) -> None:
    config = {"mode": "lora", "batching": "pairs", "max_length": 1024, "steps": 1, "stage": "dpo"}
    command = [
        sys.executable,
        str(BENCH_DIR / "train_once.py"),
        json.dumps(config),
        str(tiny_chat_checkpoint),
        str(tiny_chat_checkpoint),
        str(tmp_path / "work"),
        "--data_cache_dir",
        str(tmp_path / "cache"),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    result = json.loads(lines[-1][len(RESULT_PREFIX) :])
    tokens = result["tokens"]
    # 1 step of 4 micro-batches of 2 pairs (4 sequences, padded together); the first is the warm-up
    assert result["measured_micro_batches"] == 3
    assert 0 < tokens["supervised"] < tokens["real_tokens"] < tokens["padded_tokens"]
    assert "--stage" in result["flags"] and result["train_loss"] == pytest.approx(0.693, abs=0.01)  # log 2


def test_peaks_are_the_childs_own_when_a_large_process_starts_it(tmp_path: Path) -> None:
    """Linux keeps ru_maxrss across exec, so a child of a 1.5 GB process would report 1.5 GB: the
    benchmark's children and the toolkit's own peak (VmHWM) must report what the child itself used."""
    script = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(BENCH_DIR)!r})\n"
        "from pathlib import Path\n"
        "from memory import run_child\n"
        "held = bytearray(1536 * 2**20)\n"
        "held[::4096] = b'x' * len(held[::4096])\n"  # touch every page: resident
        "log = Path(sys.argv[1])\n"
        "child = 'from qwen_finetune.run_metrics import peak_rss_bytes; print(\"OWN\", peak_rss_bytes())'\n"
        "run = run_child(['-c', child], log)\n"
        "own = int(log.read_text().split('OWN')[1])\n"
        "print(json.dumps({'measured': run.peak_rss_bytes, 'own': own, 'exit': run.exit_code}))\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "child.log")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    figures = json.loads(completed.stdout.strip().splitlines()[-1])
    assert figures["exit"] == 0
    assert figures["measured"] < 1024 * 2**20 and figures["own"] < 1024 * 2**20, figures


PUBLISHED_PATHS = [
    ("/srv/ci/main", "."),
    ("/srv/ci/main/bench/results/models/small", "bench/results/models/small"),
    ("/srv/ci/shared/data/a.json,/srv/ci/shared/data/b.json", "../shared/data/a.json,../shared/data/b.json"),
    (
        "finetune.py --data=/srv/ci/shared/d.json --out bench/results/work/x",
        "finetune.py --data=../shared/d.json --out bench/results/work/x",
    ),
    ("tok/s", "tok/s"),
    ("/opt/other/file", "/opt/other/file"),
    ("/srv/cix/file", "/srv/cix/file"),
]


@pytest.mark.parametrize(("given", "published"), PUBLISHED_PATHS)
def test_published_paths_are_relative_to_the_repository(given: str, published: str) -> None:
    summary = {"runs": [{"flags": ["--seed", "1", given]}], "steps": 4}
    expected = {"runs": [{"flags": ["--seed", "1", published]}], "steps": 4}
    assert repository_relative(summary, root="/srv/ci/main") == expected


@pytest.mark.parametrize("name", ["results.json", "plan_vs_measured.json"])
def test_committed_results_name_no_absolute_path(name: str) -> None:
    def strings(value: object) -> list[str]:
        if isinstance(value, dict):
            return [text for item in value.values() for text in strings(item)]
        if isinstance(value, list):
            return [text for item in value for text in strings(item)]
        return [value] if isinstance(value, str) else []

    texts = strings(json.loads((BENCH_DIR / name).read_text()))
    assert texts and not [text for text in texts if re.search(PATH_START + "/", text)]

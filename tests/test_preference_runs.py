"""Preference training (--stage dpo) through finetune.py's own path, end to end.

Every mode (full, LoRA, LoRA with trainable embeddings, Q-LoRA on GPTQ and on NF4) under DeepSpeed
ZeRO-2 and ZeRO-3 (Q-LoRA: ZeRO-2 only) on 1 and 2 processes trains a few DPO steps on eight
memorisable pairs. Each run evaluates on all pairs before its first step (the reference is the
starting model, so the loss is exactly log 2) and after its last; the saved artifact, reloaded here
with its reference, must give that last evaluation. ZeRO-3 must give ZeRO-2's loss curve, and the
precomputed reference the frozen copy's. The runs of one process count share one launch
(`MATRIX_RUNNER`), which saves the start-up of a process per run. Also: kill-and-resume, a LoRA run on
LLaMA-Factory's DPO demo pairs that raises the reward accuracy on its training pairs, and the merge of
its adapter (merge_lora.py's self-check) into a model that chats.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import launch_helpers
import pytest
import torch
import train_helpers as helpers

from qwen_finetune.args import parse_run_arguments
from qwen_finetune.errors import ArgumentError
from qwen_finetune.train import train

pytestmark = pytest.mark.slow

STEPS = 4
PAIRS = [
    ("What colour is the sky?", "Blue.", "Green."),
    ("What is two plus two?", "Four.", "Five."),
    ("Name a fruit.", "Apple.", "Carrot."),
    ("What is the capital of France?", "Paris.", "Rome."),
    ("Say hello.", "Hello!", "Goodbye!"),
    ("What do cows say?", "Moo.", "Woof."),
    ("How many legs has a spider?", "Eight.", "Six."),
    ("What is ice made of?", "Water.", "Sand."),
]
MAX_LENGTH = 64
LOG_2 = math.log(2.0)  # the DPO loss while the policy is still the reference
MODE_FLAGS = {
    "full": [],
    "lora": ["--use_lora"],
    "lora_emb": ["--use_lora"],  # on the base model: the embeddings are trained (auto)
    "gptq": ["--use_lora", "--q_lora"],
    "nf4": ["--use_lora", "--q_lora", "--q_lora_backend", "nf4"],
}
LEARNING_RATE = {"full": 1e-3, "lora": 3e-3, "lora_emb": 3e-3, "gptq": 3e-3, "nf4": 3e-3}
CELLS = [
    (mode, zero) for mode in MODE_FLAGS for zero in (2, 3) if not (mode in ("gptq", "nf4") and zero == 3)
]
PRECOMPUTED = ("full_precomputed", 3)  # 2 processes only: the reference of the kill-and-resume test

# Trains every flag list of a JSON file in turn, in the processes of one launch. Between runs the
# global state a run leaves behind (accelerate's shared state, the DeepSpeed config transformers
# keeps) is reset, so each run starts as in a process of its own.
MATRIX_RUNNER = """
import gc
import json
import sys

from accelerate.state import AcceleratorState, GradientState
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

from qwen_finetune.args import parse_run_arguments
from qwen_finetune.train import configure_logging, train

configure_logging()
for flags in json.loads(open(sys.argv[1], encoding="utf-8").read()):
    train(parse_run_arguments(flags))
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    unset_hf_deepspeed_config()
    gc.collect()
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("preference-runs")


@pytest.fixture(scope="module")
def pairs_file(workdir: Path) -> Path:
    """The pairs in LLaMA-Factory's ranking layout."""
    rows = [
        {
            "conversations": [{"from": "human", "value": question}],
            "chosen": {"from": "gpt", "value": chosen},
            "rejected": {"from": "gpt", "value": rejected},
        }
        for question, chosen, rejected in PAIRS
    ]
    path = workdir / "pairs.json"
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def gptq_checkpoint(
    tiny_chat_checkpoint: Path, workdir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    calibration = helpers.write_memorisable_data(workdir / "calibration.json")
    return helpers.tiny_gptq_checkpoint(tiny_chat_checkpoint, tmp_path_factory.getbasetemp(), calibration)


@pytest.fixture(scope="module")
def checkpoints(
    tiny_chat_checkpoint: Path, tiny_base_checkpoint: Path, gptq_checkpoint: Path
) -> dict[str, Path]:
    return {
        "full": tiny_chat_checkpoint,
        "full_precomputed": tiny_chat_checkpoint,
        "lora": tiny_chat_checkpoint,
        "lora_emb": tiny_base_checkpoint,
        "gptq": gptq_checkpoint,
        "nf4": tiny_chat_checkpoint,
    }


def dpo_flags(
    model: Path, data: Path, output: Path, cache: Path, *, processes: int, learning_rate: float, extra=()
) -> list[str]:
    """A few deterministic float32 steps of DPO (beta 1: the loss moves within them), with an evaluation on
    all pairs before the first step and after the last (one eval batch per process)."""
    return [
        *["--model_name_or_path", str(model), "--data_path", str(data), "--eval_data_path", str(data)],
        *[
            "--output_dir",
            str(output),
            "--data_cache_dir",
            str(cache),
            "--stage",
            "dpo",
            "--pref_beta",
            "1.0",
        ],
        *["--model_max_length", str(MAX_LENGTH), "--per_device_train_batch_size", "2"],
        *["--per_device_eval_batch_size", str(len(PAIRS) // processes), "--max_steps", str(STEPS)],
        *["--learning_rate", str(learning_rate), "--lr_scheduler_type", "constant", "--warmup_ratio", "0"],
        *[
            "--weight_decay",
            "0",
            "--eval_strategy",
            "steps",
            "--eval_steps",
            str(STEPS),
            "--eval_on_start",
            "True",
        ],
        *["--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--bf16", "False"],
        *["--fp16", "False", "--lora_r", "8", "--lora_alpha", "32", "--seed", "0", "--disable_tqdm", "True"],
        *extra,
    ]


def cell_flags(
    mode: str, zero: int, processes: int, checkpoints, pairs_file: Path, workdir: Path
) -> list[str]:
    extra = ["--deepspeed", str(helpers.DS_ZERO2 if zero == 2 else helpers.DS_ZERO3)]
    if mode == "full_precomputed":
        extra.append("--precompute_ref_logps")
    return dpo_flags(
        checkpoints[mode],
        pairs_file,
        workdir / f"{mode}-zero{zero}-{processes}proc",
        workdir / "data-cache",
        processes=processes,
        learning_rate=LEARNING_RATE[mode.removesuffix("_precomputed")],
        extra=[*MODE_FLAGS[mode.removesuffix("_precomputed")], *extra],
    )


@pytest.fixture(scope="module")
def matrices(checkpoints, pairs_file: Path, workdir: Path):
    """processes -> every cell trained on that many processes in one torchrun launch (launched when
    first asked for): {"outputs": cell -> output dir, "flags": cell -> finetune.py flags}."""
    done: dict[int, dict[str, Any]] = {}

    def get(processes: int) -> dict[str, Any]:
        if processes not in done:
            cells = CELLS + ([PRECOMPUTED] if processes == 2 else [])
            runs = {cell: cell_flags(*cell, processes, checkpoints, pairs_file, workdir) for cell in cells}
            plan = workdir / f"matrix-{processes}.json"
            plan.write_text(json.dumps(list(runs.values())), encoding="utf-8")
            runner = workdir / "matrix_runner.py"
            runner.write_text(MATRIX_RUNNER, encoding="utf-8")
            helpers.run(
                helpers.torchrun(processes, runner, [str(plan)], port=helpers.free_port()), timeout=900
            )
            outputs = {cell: Path(flags[flags.index("--output_dir") + 1]) for cell, flags in runs.items()}
            done[processes] = {"outputs": outputs, "flags": runs}
        return done[processes]

    return get


# --------------------------------------------------------------------------------------- reloading


def pair_batch(checkpoint: Path, data: Path, cache: Path) -> dict[str, torch.Tensor]:
    """All pairs, encoded and collated as for training, as one batch."""
    from qwen_finetune.data import DataArguments
    from qwen_finetune.model_loading import load_tokenizer
    from qwen_finetune.preference import make_preference_data

    tokenizer = load_tokenizer(checkpoint, MAX_LENGTH)
    data_args = DataArguments(data_path=str(data), data_cache_dir=str(cache))
    prepared = make_preference_data(data_args, tokenizer, MAX_LENGTH)
    return prepared.data_collator(
        [prepared.train_dataset[index] for index in range(len(prepared.train_dataset))]
    )


@pytest.fixture(scope="module")
def batch(tiny_chat_checkpoint: Path, pairs_file: Path, workdir: Path) -> dict[str, torch.Tensor]:
    return pair_batch(tiny_chat_checkpoint, pairs_file, workdir / "data-cache")


@torch.no_grad()
def reloaded_dpo(output: Path, base: Path, batch: dict[str, torch.Tensor], **load: Any) -> dict[str, float]:
    """The DPO loss and metrics (beta 1) of the saved artifact against its reference: an adapter against
    its base with the adapter switched off, a full model against the starting checkpoint."""
    from qwen_finetune.preference import PreferenceArguments, pair_logps, preference_loss

    policy = helpers.load_artifact(output, **load).eval()
    logps = pair_logps(policy, batch)
    if (output / "adapter_config.json").is_file():
        with policy.disable_adapter():
            reference = pair_logps(policy, batch)
    else:
        reference = pair_logps(helpers.load_artifact(base).eval(), batch)
    loss, metrics = preference_loss(logps, reference, PreferenceArguments(stage="dpo", pref_beta=1.0))
    return {"loss": float(loss), **{name: float(value) for name, value in metrics.items()}}


def evaluations(output: Path) -> list[dict[str, Any]]:
    return [entry for entry in helpers.log_history(output) if "eval_loss" in entry]


def check_dpo_run(output: Path, base: Path, batch, *, processes: int, adapter: bool, **load: Any) -> None:
    helpers.assert_artifacts(output, adapter=adapter)
    history = helpers.log_history(output)
    steps = [entry for entry in history if "loss" in entry]
    assert [entry["step"] for entry in steps] == list(range(1, STEPS + 1))
    for entry in steps:  # every log carries the preference metrics, averaged like the loss
        assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins"} <= set(entry)
        assert {"logps/chosen", "logps/rejected"} <= set(entry)
    start, end = evaluations(output)
    assert start["step"] == 0 and start["eval_loss"] == pytest.approx(LOG_2, abs=1e-5)
    assert start["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert end["eval_loss"] < LOG_2 - 0.05, end
    assert end["eval_rewards/margins"] > 0.05 and end["eval_rewards/accuracies"] >= 0.75, end
    reloaded = reloaded_dpo(output, base, batch, **load)
    assert reloaded["loss"] == pytest.approx(end["eval_loss"], rel=1e-4)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen"):
        assert reloaded[name] == pytest.approx(end[f"eval_{name}"], rel=1e-4, abs=1e-5), name
    summary = helpers.summary(output)
    assert (summary["processes"], summary["global_steps"]) == (processes, STEPS)
    assert summary["preference"]["last_log"]["step"] == STEPS
    assert summary["preference"]["last_eval"]["rewards/accuracies"] == end["eval_rewards/accuracies"]
    # one data-parallel group: each step took 2 pairs from every process
    assert steps[-1]["epoch"] == pytest.approx(STEPS * 2 * processes / len(PAIRS))


@pytest.mark.distributed
@pytest.mark.parametrize(("mode", "zero"), CELLS, ids=[f"{mode}-zero{zero}" for mode, zero in CELLS])
@pytest.mark.parametrize("processes", [1, 2], ids=["1proc", "2proc"])
def test_every_mode_trains_and_reloads(
    matrices, processes: int, mode: str, zero: int, checkpoints, batch
) -> None:
    output = matrices(processes)["outputs"][mode, zero]
    load = {"quantization_config": helpers.nf4_quantization(), "device_map": "cpu"} if mode == "nf4" else {}
    check_dpo_run(output, checkpoints[mode], batch, processes=processes, adapter=mode != "full", **load)
    summary = helpers.summary(output)
    assert summary["train_embeddings"] == (mode in ("full", "lora_emb"))
    expected = "frozen_copy" if mode == "full" else "adapter_disabled"
    assert summary["preference"]["reference"] == expected


@pytest.mark.distributed
@pytest.mark.parametrize("mode", ["full", "lora", "lora_emb"])
@pytest.mark.parametrize("processes", [1, 2], ids=["1proc", "2proc"])
def test_zero3_gives_the_zero2_loss_curve(matrices, processes: int, mode: str) -> None:
    """Partitioned weights (and, for full fine-tuning, a partitioned frozen reference) change nothing."""
    zero2, zero3 = (matrices(processes)["outputs"][mode, zero] for zero in (2, 3))
    assert helpers.loss_curve(zero3) == pytest.approx(helpers.loss_curve(zero2), rel=1e-4)
    assert evaluations(zero3)[-1]["eval_loss"] == pytest.approx(evaluations(zero2)[-1]["eval_loss"], rel=1e-4)


@pytest.mark.distributed
def test_precomputed_reference_gives_the_frozen_copy_curve(matrices, checkpoints, batch, workdir) -> None:
    """Full fine-tuning, ZeRO-3, 2 processes, no reference model while training."""
    matrix = matrices(2)
    precomputed = matrix["outputs"][PRECOMPUTED]
    frozen = matrix["outputs"]["full", 3]
    check_dpo_run(precomputed, checkpoints["full"], batch, processes=2, adapter=False)
    assert helpers.summary(precomputed)["preference"]["reference"] == "precomputed"
    assert helpers.loss_curve(precomputed) == pytest.approx(helpers.loss_curve(frozen), rel=1e-4)
    entries = list((workdir / "data-cache" / "reference_logps").glob("*/logps.safetensors"))
    assert len(entries) == 1  # the training and the evaluation pairs are the same pairs: one entry


def test_qlora_under_zero3_is_refused(gptq_checkpoint: Path, pairs_file: Path, workdir: Path) -> None:
    flags = dpo_flags(
        gptq_checkpoint,
        pairs_file,
        workdir / "refused",
        workdir / "data-cache",
        processes=1,
        learning_rate=1e-3,
        extra=[*MODE_FLAGS["gptq"], "--deepspeed", str(helpers.DS_ZERO3)],
    )
    with pytest.raises(ArgumentError, match="ZeRO-3"):
        train(parse_run_arguments(flags))
    assert not (workdir / "refused").exists()


@pytest.mark.distributed
def test_kill_and_resume_reproduces_the_loss_curve(matrices, workdir: Path) -> None:
    """Full fine-tuning, ZeRO-3, 2 processes, precomputed reference: SIGKILL at step 3, resume from
    checkpoint-2 (the reference log-probabilities come from the cache, not from trained weights)."""
    matrix = matrices(2)
    reference = matrix["outputs"][PRECOMPUTED]
    output = workdir / "full-precomputed-killed"
    argv = [str(output) if item == str(reference) else item for item in matrix["flags"][PRECOMPUTED]]
    argv += ["--save_strategy", "steps", "--save_steps", "2"]
    runner = helpers.write_kill_runner(workdir)
    killed = helpers.torchrun(2, runner, argv, port=helpers.free_port())
    helpers.run_killed(killed, env=helpers.subprocess_env(KILL_AT_STEP="3"))
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-2"]
    resumed = [*argv, "--resume_from_checkpoint", str(output / "checkpoint-2")]
    log = helpers.run(helpers.torchrun(2, helpers.FINETUNE_PY, resumed, port=helpers.free_port()))
    trained = [int(step) for step in re.findall(r"^step (\d+)/\d+ \| epoch", log, flags=re.MULTILINE)]
    assert trained == [3, 4], log[-3000:]
    assert helpers.loss_curve(output) == pytest.approx(helpers.loss_curve(reference), rel=1e-4)
    for name in ("rewards/margins", "rewards/accuracies"):
        resumed_values = [entry[name] for entry in helpers.log_history(output) if name in entry]
        reference_values = [entry[name] for entry in helpers.log_history(reference) if name in entry]
        assert resumed_values == pytest.approx(reference_values, rel=1e-4, abs=1e-6)
    assert evaluations(output)[-1]["eval_loss"] == pytest.approx(
        evaluations(reference)[-1]["eval_loss"], rel=1e-4
    )


def test_launch_script_runs_the_dpo_recipe(tmp_path: Path) -> None:
    script = helpers.REPO_ROOT / "finetune" / "finetune_dpo_lora_ds.sh"
    python = launch_helpers.write_fake_python(tmp_path / "bin")
    launched = launch_helpers.launch(
        script, ["-m", "M", "-d", "pairs.json", "--pref_loss", "ipo"], tmp_path, python=python
    )
    assert launched.argv is not None, launched.completed.stderr
    launcher, argv = launch_helpers.split_command(launched.argv)
    assert launcher[:3] == ["-m", "torch.distributed.run", "--nproc_per_node"]
    assert argv[:2] == ["--config", str(helpers.REPO_ROOT / "finetune" / "recipes" / "dpo_lora.yaml")]
    arguments = parse_run_arguments(argv)
    assert (arguments.preference.stage, arguments.preference.pref_loss) == ("dpo", "ipo")
    assert arguments.lora.use_lora and arguments.training.zero_stage == 2
    assert arguments.data.data_path == "pairs.json"


# ------------------------------------------------------------------------------ the demo pairs


DEMO_MAX_LENGTH = 160  # the 12 demo pairs that fit whole (drop_turns skips the others)


@pytest.fixture(scope="module")
def demo_run(tiny_chat_checkpoint: Path, shared_data_dir: Path, workdir: Path) -> Path:
    """LoRA DPO (beta 0.1) on LLaMA-Factory's English demo pairs, one process, 3 epochs, evaluated on the
    training pairs before the first step and after each epoch."""
    demo = shared_data_dir / "llamafactory_dpo_en_demo.json"
    output = workdir / "demo-lora"
    flags = [
        *[
            "--model_name_or_path",
            str(tiny_chat_checkpoint),
            "--data_path",
            str(demo),
            "--eval_data_path",
            str(demo),
        ],
        *["--output_dir", str(output), "--data_cache_dir", str(workdir / "data-cache"), "--stage", "dpo"],
        *["--use_lora", "--lora_r", "8", "--lora_alpha", "32", "--model_max_length", str(DEMO_MAX_LENGTH)],
        *[
            "--per_device_train_batch_size",
            "2",
            "--per_device_eval_batch_size",
            "12",
            "--num_train_epochs",
            "2",
        ],
        *[
            "--learning_rate",
            "1e-2",
            "--lr_scheduler_type",
            "constant",
            "--warmup_ratio",
            "0",
            "--weight_decay",
            "0",
        ],
        *[
            "--eval_strategy",
            "epoch",
            "--eval_on_start",
            "True",
            "--logging_steps",
            "1",
            "--save_strategy",
            "no",
        ],
        *["--report_to", "none", "--bf16", "False", "--seed", "0", "--disable_tqdm", "True"],
    ]
    train(parse_run_arguments(flags))
    return output


def test_dpo_raises_the_reward_accuracy_on_the_demo_pairs(demo_run: Path) -> None:
    before, *_, after = evaluations(demo_run)
    assert helpers.summary(demo_run)["preference"]["reference"] == "adapter_disabled"
    assert json.loads((demo_run / "data_stats.json").read_text())["train"]["samples_kept"] == 12
    # before the first step the policy is its reference: no reward, no preference
    assert before["eval_loss"] == pytest.approx(LOG_2, abs=1e-5)
    assert before["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert after["eval_rewards/accuracies"] >= 0.8  # chance: 0.5
    assert after["eval_rewards/margins"] > 0.2
    assert after["eval_loss"] < LOG_2 - 0.1


def test_merged_dpo_adapter_equals_base_plus_adapter_and_chats(
    demo_run: Path, tiny_chat_checkpoint: Path, workdir: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qwen_finetune.merge import MergeArguments, merge_adapter
    from qwen_model.qwen_generation_utils import make_context

    merged_dir = workdir / "demo-merged"
    report = merge_adapter(MergeArguments(adapter_dir=str(demo_run), output_dir=str(merged_dir)))
    assert report["max_abs_logit_diff"] <= report["tolerance"] <= 1e-3
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = torch.tensor([make_context(tokenizer, "Give me three tips for a good night's sleep.")[1]])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_checkpoint, dtype=torch.float32)
    with torch.no_grad():
        expected = PeftModel.from_pretrained(base, demo_run).eval()(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, atol=1e-4, rtol=1e-4)
    question = "Give me three tips for a good night's sleep."
    response, history = merged.chat(tokenizer, question, history=None, do_sample=False, max_new_tokens=16)
    assert isinstance(response, str) and history[-1][1] == response

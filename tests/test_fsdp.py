"""FSDP (`--fsdp`, `--fsdp_config`) on CPU: sharded for real, or refused with the reason.

Two CPU processes (torchrun, gloo) under FSDP2 must train exactly like one process without FSDP on
the same global batch (loss curve and final evaluation to 1e-4), hold half of every parameter and
of the optimizer state each, save a complete model / adapter directory that reloads and reproduces
the final evaluation loss, and resume from a checkpoint after a SIGKILL with the uninterrupted loss
curve. Modes: full fine-tuning (chat model) and LoRA with trainable `wte`/`lm_head` (base model:
LoRA layers and whole modules side by side). The refusals are checked in-process: nothing there
trains.

The runs go through a small finetune.py stand-in that reports what each process holds after its
first step and can kill itself at a given step."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import train_helpers as helpers

from qwen_finetune.args import parse_args
from qwen_finetune.errors import ArgumentError
from qwen_finetune.fsdp import check_fsdp_request, read_fsdp_config
from qwen_finetune.training_mode import choose_training_mode

STEPS = 4
GLOBAL_BATCH = 4  # 2 processes x 2 samples, or 1 process x 4
WTE = "transformer.wte"

# case -> (checkpoint kind, method): full fine-tuning, and LoRA with whole trainable embeddings
CASES = {"full": ("chat", "full"), "lora-embeddings": ("base", "lora")}

FSDP_RUNNER = """
import json
import os
import signal
import sys
from pathlib import Path

from torch.distributed.tensor import DTensor
from transformers import TrainerCallback

from qwen_finetune.args import parse_run_arguments
from qwen_finetune.train import configure_logging, train


def local_numel(tensor):
    return tensor.to_local().numel() if isinstance(tensor, DTensor) else tensor.numel()


class ShardReport(TrainerCallback):
    \"\"\"After the first step of the run: every parameter's full and local element count on this
    process, and the same for the optimizer's first moments, in $SHARD_REPORT_DIR/rank<RANK>.json.\"\"\"

    def __init__(self):
        self.written = False

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.written:
            return
        self.written = True
        parameters = {
            name: [parameter.numel(), local_numel(parameter), isinstance(parameter, DTensor)]
            for name, parameter in model.named_parameters()
        }
        moments = [item["exp_avg"] for item in optimizer.state.values() if "exp_avg" in item]
        report = {
            "parameters": parameters,
            "optimizer": [sum(m.numel() for m in moments), sum(local_numel(m) for m in moments)],
        }
        path = Path(os.environ["SHARD_REPORT_DIR"]) / f"rank{os.environ['RANK']}.json"
        path.write_text(json.dumps(report))


class KillAtStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == int(os.environ.get("KILL_AT_STEP", "0")):
            os.kill(os.getpid(), signal.SIGKILL)


configure_logging()
train(parse_run_arguments(sys.argv[1:]), callbacks=[ShardReport(), KillAtStep()])
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fsdp")


@pytest.fixture(scope="module")
def data_file(workdir: Path) -> Path:
    return helpers.write_memorisable_data(workdir / "facts.json")


@pytest.fixture(scope="module")
def batch(tiny_chat_checkpoint: Path, data_file: Path, workdir: Path):
    return helpers.encoded_batch(tiny_chat_checkpoint, data_file, workdir / "data-cache")


@pytest.fixture(scope="module")
def runner(workdir: Path) -> Path:
    path = workdir / "fsdp_finetune.py"
    path.write_text(FSDP_RUNNER, encoding="utf-8")
    return path


def case_flags(case: str, checkpoints, data: Path, output: Path, workdir: Path, processes: int) -> list[str]:
    """The same run on 1 or 2 processes: the global batch is the same, LoRA dropout is off (its
    random masks depend on how the batch is split)."""
    kind, method = CASES[case]
    return helpers.training_flags(
        checkpoints[kind],
        data,
        output,
        steps=STEPS,
        learning_rate=helpers.LEARNING_RATE[method],
        processes=processes,
        cache_dir=workdir / "data-cache",
        extra=[
            *helpers.METHOD_FLAGS[method],
            "--per_device_train_batch_size",
            str(GLOBAL_BATCH // processes),
            "--lora_dropout",
            "0",
        ],
    )


@pytest.fixture(scope="module")
def one_process_runs(checkpoints, data_file: Path, workdir: Path):
    """Each case in one process without FSDP: the reference loss curve."""
    done: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in done:
            output = workdir / f"{case}-one-process"
            helpers.run(
                [
                    helpers.PYTHON,
                    str(helpers.FINETUNE_PY),
                    *case_flags(case, checkpoints, data_file, output, workdir, 1),
                ]
            )
            done[case] = output
        return done[case]

    return get


@pytest.fixture(scope="module")
def fsdp_runs(checkpoints, data_file: Path, workdir: Path, runner: Path):
    """Each case on 2 processes under --fsdp: (output dir, flags, per-rank shard reports, log)."""
    done: dict[str, tuple[Path, list[str], list[dict], str]] = {}

    def get(case: str) -> tuple[Path, list[str], list[dict], str]:
        if case not in done:
            output = workdir / f"{case}-fsdp"
            argv = [*case_flags(case, checkpoints, data_file, output, workdir, 2), "--fsdp"]
            reports = workdir / f"{case}-fsdp-shards"
            reports.mkdir(exist_ok=True)
            command = helpers.torchrun(2, runner, argv, port=helpers.free_port())
            log = helpers.run(command, env=helpers.subprocess_env(SHARD_REPORT_DIR=str(reports)))
            shards = [json.loads((reports / f"rank{rank}.json").read_text()) for rank in (0, 1)]
            done[case] = (output, argv, shards, log)
        return done[case]

    return get


def assert_sharded_in_halves(shards: list[dict]) -> None:
    """Every parameter is a DTensor of which each process holds its own part (none is replicated),
    the embedding rows exactly half each; the optimizer's moments are split the same way."""
    names = set(shards[0]["parameters"])
    assert names == set(shards[1]["parameters"])
    for name in names:
        (full, first, first_dtensor), (_, second, second_dtensor) = (
            shards[rank]["parameters"][name] for rank in (0, 1)
        )
        assert first_dtensor and second_dtensor, f"{name} is not sharded"
        assert first + second == full, f"{name}: {first} + {second} elements held of {full}"
    embeddings = [name for name in names if WTE in name and name.endswith("weight")]
    assert embeddings, sorted(names)
    for name in embeddings:
        full = shards[0]["parameters"][name][0]
        assert [shards[rank]["parameters"][name][1] for rank in (0, 1)] == [full // 2, full // 2], name
    (moments, first), (_, second) = shards[0]["optimizer"], shards[1]["optimizer"]
    assert moments > 0 and first + second == moments and abs(first - second) < moments // 10


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_two_processes_match_one_process(case, fsdp_runs, one_process_runs, batch):
    output, _, shards, log = fsdp_runs(case)
    reference = one_process_runs(case)

    assert "FSDP2 on 2 CPU processes" in log
    assert "find_unused_parameters" not in log  # the DDP reducer's warning: no DDP wrapper at all
    assert_sharded_in_halves(shards)

    sharded, single = helpers.loss_curve(output), helpers.loss_curve(reference)
    assert len(sharded) == len(single) == STEPS
    assert sharded == pytest.approx(single, rel=1e-4), (sharded, single)
    assert helpers.final_eval_loss(output) == pytest.approx(helpers.final_eval_loss(reference), rel=1e-4)

    adapter = CASES[case][1] == "lora"
    helpers.assert_artifacts(output, adapter=adapter)
    helpers.assert_reload_reproduces(output, batch)
    summary = helpers.summary(output)
    assert (summary["processes"], summary["global_steps"]) == (2, STEPS)
    assert (
        summary["train_embeddings"] is True
    )  # full trains every weight; the base model's LoRA trains wte/lm_head


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("case", ["lora-embeddings"])
def test_fsdp_kill_and_resume(case, fsdp_runs, runner, workdir, batch):
    """SIGKILL both processes at step 3, resume from checkpoint-2 (a complete model / adapter
    directory plus accelerate's FSDP model and optimizer state): steps 3 and 4 are trained again
    and the loss curve and final evaluation are the uninterrupted run's. One case, the LoRA one:
    full fine-tuning resumes through the same Trainer path (2.5 more minutes for the same code)."""
    reference, argv, _, _ = fsdp_runs(case)
    output = workdir / f"{case}-fsdp-killed"
    argv = [str(output) if item == str(reference) else item for item in argv]
    argv += ["--save_strategy", "steps", "--save_steps", "2"]
    reports = workdir / f"{case}-fsdp-killed-shards"
    reports.mkdir(exist_ok=True)
    command = helpers.torchrun(2, runner, argv, port=helpers.free_port())
    helpers.run_killed(command, env=helpers.subprocess_env(KILL_AT_STEP="3", SHARD_REPORT_DIR=str(reports)))
    checkpoint = output / "checkpoint-2"
    assert sorted(path.name for path in output.glob("checkpoint-*")) == [checkpoint.name]
    assert {"pytorch_model_fsdp.bin", "optimizer.bin"} <= {path.name for path in checkpoint.iterdir()}
    adapter = CASES[case][1] == "lora"
    assert (checkpoint / ("adapter_config.json" if adapter else "config.json")).is_file()

    resume = [*argv, "--resume_from_checkpoint", str(checkpoint)]
    command = helpers.torchrun(2, runner, resume, port=helpers.free_port())
    log = helpers.run(command, env=helpers.subprocess_env(SHARD_REPORT_DIR=str(reports)))
    trained = [int(step) for step in re.findall(r"^step (\d+)/\d+ \| epoch", log, flags=re.MULTILINE)]
    assert trained == [3, 4], f"the resumed run trained steps {trained}:\n{log[-3000:]}"
    resumed, uninterrupted = helpers.loss_curve(output), helpers.loss_curve(reference)
    assert len(resumed) == len(uninterrupted) == STEPS
    assert resumed == pytest.approx(uninterrupted, rel=1e-4), (resumed, uninterrupted)
    assert helpers.final_eval_loss(output) == pytest.approx(helpers.final_eval_loss(reference), rel=1e-4)
    helpers.assert_artifacts(output, adapter=adapter)
    helpers.assert_reload_reproduces(output, batch)


# ------------------------------------------------------------------------------------------ refusals


@pytest.fixture
def fsdp_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parsing --fsdp sets FSDP_CPU_RAM_EFFICIENT_LOADING in this process; restored afterwards."""
    monkeypatch.delenv("FSDP_CPU_RAM_EFFICIENT_LOADING", raising=False)


def request(checkpoint: Path, workdir: Path, flags: list[str]):
    """(training arguments, training mode, LoRA arguments) of a one-process finetune.py command line."""
    helpers.write_memorisable_data(workdir / "facts.json")
    argv = [
        "--model_name_or_path",
        str(checkpoint),
        "--data_path",
        str(workdir / "facts.json"),
        "--output_dir",
        str(workdir / "refused"),
        "--report_to",
        "none",
        *flags,
    ]
    model_args, _, training_args, lora_args = parse_args(argv)
    return training_args, choose_training_mode(model_args, lora_args, training_args), lora_args


REFUSALS = [
    (["--fsdp_config", '{"reshard_after_forward": true}'], "applies only with --fsdp"),
    (["--fsdp", "--deepspeed", str(helpers.DS_ZERO2)], "choose one"),
    (["--fsdp", "--fsdp_config", '{"version": 1}'], "only FSDP2"),
    (["--fsdp", "--fsdp_config", '{"state_dict_type": "SHARDED_STATE_DICT"}'], "FULL_STATE_DICT"),
    (["--fsdp", "--fsdp_config", '{"cpu_offload": true}'], "already live in CPU memory"),
    (["--fsdp", "full_shard offload"], "already live in CPU memory"),
    (["--fsdp", "--fsdp_config", '{"xla": true}'], "XLA"),
    (
        ["--fsdp", "--fsdp_config", '{"activation_checkpointing": true}', "--gradient_checkpointing"],
        "keep one",
    ),
    (["--fsdp", "--save_only_model", "--load_best_model_at_end", "--eval_strategy", "steps"], "drop one"),
    (["--fsdp", "--use_lora", "--q_lora", "--q_lora_backend", "nf4"], "cannot shard a Q-LoRA run"),
    (["--fsdp", "--use_lora", "--init_lora_weights", "pissa"], "--init_lora_weights pissa with --fsdp"),
    (["--fsdp", "--use_lora", "--init_lora_weights", "olora"], "--init_lora_weights olora with --fsdp"),
    (["--fsdp"], "this run has 1"),
    (["--fsdp", "full_shard auto_wrap"], "this run has 1"),  # the older form, read by transformers
    (["--fsdp", "--use_lora"], "this run has 1"),
]


@pytest.mark.usefixtures("fsdp_environment")
@pytest.mark.parametrize(("flags", "message"), REFUSALS, ids=[" ".join(flags) for flags, _ in REFUSALS])
def test_refused_requests(flags, message, tiny_chat_checkpoint, tmp_path):
    training_args, mode, lora_args = request(tiny_chat_checkpoint, tmp_path, flags)
    with pytest.raises(ArgumentError, match=re.escape(message)):
        check_fsdp_request(training_args, mode, lora_args)


@pytest.mark.usefixtures("fsdp_environment")
def test_gptq_qlora_refused(tiny_chat_checkpoint, tmp_path):
    """A GPTQ base (the mode as a GPTQ checkpoint yields it) is refused like NF4."""
    training_args, mode, lora_args = request(tiny_chat_checkpoint, tmp_path, ["--fsdp", "--use_lora"])
    gptq = dataclasses.replace(mode, method="qlora", quantization="gptq")
    with pytest.raises(ArgumentError, match="gptq base weights are not sharded"):
        check_fsdp_request(training_args, gptq, lora_args)


def test_no_fsdp_requested_passes(tiny_chat_checkpoint, tmp_path):
    training_args, mode, lora_args = request(tiny_chat_checkpoint, tmp_path, [])
    assert check_fsdp_request(training_args, mode, lora_args) is None


def test_read_fsdp_config(tmp_path):
    config = tmp_path / "fsdp.json"
    config.write_text('{"reshard_after_forward": false}')
    assert read_fsdp_config(str(config)) == {"reshard_after_forward": False}
    assert read_fsdp_config('{"version": 2}') == {"version": 2}
    assert read_fsdp_config({"version": 2}) == {"version": 2}
    with pytest.raises(ArgumentError, match="no such file"):
        read_fsdp_config(str(tmp_path / "missing.json"))
    config.write_text('{"version": 2,}')
    with pytest.raises(ArgumentError, match="invalid JSON at line 1"):
        read_fsdp_config(str(config))
    config.write_text("[1, 2]")
    with pytest.raises(ArgumentError, match="expected a JSON object"):
        read_fsdp_config(str(config))

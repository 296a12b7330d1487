"""Multi-process training on CPU: DeepSpeed ZeRO-2 / ZeRO-3 with 2 processes (torchrun), Q-LoRA with
and without DeepSpeed on 1 and 2 processes (1 process: DeepSpeed without a launcher, rank via
mpi4py), NF4 Q-LoRA under ZeRO-2, the CPU-offload configs, two simulated nodes, and kill-and-resume
under ZeRO-2 (LoRA, full, GPTQ Q-LoRA, NF4 Q-LoRA) and ZeRO-3 (full, LoRA with trainable embeddings).
Several runs go through the launch scripts in finetune/. Every run
ends with an evaluation on the training data after its last step; the saved artifact, reloaded here,
must give that same loss. A resume test reuses a matrix run (a module-scoped fixture) as its
uninterrupted reference, so it adds only the killed and the resumed run."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import launch_helpers
import pytest
import train_helpers as helpers

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = 4
SCRIPTS = helpers.REPO_ROOT / "finetune"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train-distributed")


@pytest.fixture(scope="module")
def data_file(workdir: Path) -> Path:
    return helpers.write_memorisable_data(workdir / "facts.json")


@pytest.fixture(scope="module")
def tiny_gptq_checkpoint(
    tiny_chat_checkpoint: Path, data_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return helpers.tiny_gptq_checkpoint(tiny_chat_checkpoint, tmp_path_factory.getbasetemp(), data_file)


@pytest.fixture(scope="module")
def batch(tiny_chat_checkpoint: Path, data_file: Path, workdir: Path):
    return helpers.encoded_batch(tiny_chat_checkpoint, data_file, workdir / "data-cache")


@pytest.fixture(scope="module")
def base_loss(batch):
    cache: dict[Path, float] = {}

    def get(checkpoint: Path) -> float:
        if checkpoint not in cache:
            cache[checkpoint] = helpers.mean_supervised_loss(helpers.load_artifact(checkpoint), batch)
        return cache[checkpoint]

    return get


def flags(
    method: str, model: Path, data: Path, output: Path, workdir: Path, processes: int, extra=()
) -> list[str]:
    return helpers.training_flags(
        model,
        data,
        output,
        steps=STEPS,
        learning_rate=helpers.LEARNING_RATE[method],
        processes=processes,
        cache_dir=workdir / "data-cache",
        extra=[*helpers.METHOD_FLAGS[method], *extra],
    )


def deepspeed_flags(zero: int | None) -> list[str]:
    return [] if zero is None else ["--deepspeed", str(helpers.DS_ZERO2 if zero == 2 else helpers.DS_ZERO3)]


def torchrun_finetune(argv: list[str], processes: int = 2, script: Path = helpers.FINETUNE_PY) -> str:
    return helpers.run(helpers.torchrun(processes, script, argv, port=helpers.free_port()))


def two_process_run(
    method: str, checkpoint: Path, zero: int, name: str, data_file: Path, workdir: Path, extra=()
) -> tuple[Path, list[str]]:
    """Train on 2 processes under ZeRO-`zero` into workdir/name; returns the output dir and the flags,
    so that a resume test can repeat the run."""
    output = workdir / name
    argv = flags(method, checkpoint, data_file, output, workdir, 2, [*extra, *deepspeed_flags(zero)])
    torchrun_finetune(argv)
    return output, argv


def launch_script(name: str, model: Path, data: Path, argv: list[str], **env: str) -> str:
    """Run a finetune/*.sh script; `argv` are extra finetune.py flags (they override the script's)."""
    env.setdefault("MASTER_PORT", str(helpers.free_port()))
    command = ["bash", str(SCRIPTS / name), "-m", str(model), "-d", str(data), *argv]
    return helpers.run(command, env=helpers.subprocess_env(**env))


def launch_script_argv(name: str, model: Path, data: Path, argv: list[str], directory: Path) -> list[str]:
    """The complete finetune.py command line a finetune/*.sh script runs (its recipe, then `argv`),
    recorded by the stand-in interpreter instead of training: to repeat that run with another launcher."""
    fake = launch_helpers.write_fake_python(directory / "record-argv")
    launched = launch_helpers.launch(
        SCRIPTS / name, ["-m", str(model), "-d", str(data), *argv], directory / "record-argv", python=fake
    )
    assert launched.argv is not None, launched.completed.stderr
    return launch_helpers.split_command(launched.argv)[1]


def check_run(output: Path, base: float, batch, *, adapter: bool, processes: int, embeddings: bool) -> dict:
    helpers.assert_artifacts(output, adapter=adapter)
    helpers.assert_loss_fell(output, base)
    helpers.assert_reload_reproduces(output, batch)
    summary = helpers.summary(output)
    assert summary["processes"] == processes
    assert summary["global_steps"] == STEPS
    assert summary["train_embeddings"] == embeddings
    # the processes formed one data-parallel group (not independent trainings): each step consumed
    # 2 samples per process, and the token counts are summed over processes
    epochs = [entry["epoch"] for entry in helpers.log_history(output) if "loss" in entry]
    assert epochs[-1] == pytest.approx(STEPS * 2 * processes / helpers.DATA_SIZE)
    assert summary["tokens_seen"] > STEPS * 2 * processes * 20
    return summary


# ------------------------------------------------------------------------------------------- ZeRO-2


@pytest.fixture(scope="module")
def full_chat_zero2(checkpoints, data_file, workdir) -> tuple[Path, list[str]]:
    """Full, chat model, ZeRO-2, 2 processes: a matrix cell and the reference of the resume test."""
    return two_process_run("full", checkpoints["chat"], 2, "full-chat-zero2", data_file, workdir)


@pytest.mark.parametrize("kind", ["chat", "base"])
def test_full_zero2_two_processes(checkpoints, kind, data_file, workdir, batch, base_loss, request):
    if kind == "chat":
        output, _ = request.getfixturevalue("full_chat_zero2")
    else:  # the ZeRO-3 full script with the ZeRO-2 config
        output = workdir / f"full-{kind}-zero2"
        argv = flags("full", checkpoints[kind], data_file, output, workdir, 2, deepspeed_flags(2))
        launch_script("finetune_ds.sh", checkpoints[kind], data_file, argv, NPROC_PER_NODE="2")
    check_run(output, base_loss(checkpoints[kind]), batch, adapter=False, processes=2, embeddings=True)


@pytest.fixture(scope="module")
def lora_chat_zero2(checkpoints, data_file, workdir) -> tuple[Path, list[str]]:
    """LoRA, chat model, ZeRO-2, 2 processes: a matrix cell and the reference of the resume test."""
    return two_process_run("lora", checkpoints["chat"], 2, "lora-chat-zero2", data_file, workdir)


def test_lora_zero2_two_processes_chat(lora_chat_zero2, checkpoints, batch, base_loss):
    output, _ = lora_chat_zero2
    check_run(output, base_loss(checkpoints["chat"]), batch, adapter=True, processes=2, embeddings=False)


def test_lora_zero2_base_on_two_nodes(checkpoints, data_file, workdir, batch, base_loss):
    """Two 'nodes' of one process each on this machine, through the launch script, with the env
    variables of a real multinode run; LoRA on the base model trains the embeddings (auto)."""
    output = workdir / "lora-base-zero2-2nodes"
    argv = flags("lora", checkpoints["base"], data_file, output, workdir, 2)
    port = str(helpers.free_port())
    nodes = []
    for rank in (0, 1):
        env = helpers.subprocess_env(
            NNODES="2", NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port
        )
        env["NPROC_PER_NODE"] = "1"
        command = [
            "bash",
            str(SCRIPTS / "finetune_lora_ds.sh"),
            "-m",
            str(checkpoints["base"]),
            "-d",
            str(data_file),
        ]
        nodes.append(
            subprocess.Popen(
                [*command, *argv],
                cwd=helpers.REPO_ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for rank, (node, log) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank} failed:\n{log[-5000:]}"
    assert "--nnodes 2 --node_rank 1" in outputs[1]
    summary = check_run(
        output, base_loss(checkpoints["base"]), batch, adapter=True, processes=2, embeddings=True
    )
    assert "raw" in summary["train_embeddings_reason"]


# ------------------------------------------------------------------------------------------- ZeRO-3


@pytest.fixture(scope="module")
def full_base_zero3(checkpoints, data_file, workdir) -> tuple[Path, list[str]]:
    """Full, base model, ZeRO-3, 2 processes: a matrix cell and the reference of the resume test."""
    shards = ["--max_shard_size", "30MB"]
    return two_process_run("full", checkpoints["base"], 3, "full-base-zero3", data_file, workdir, shards)


@pytest.mark.parametrize("kind", ["chat", "base"])
def test_full_zero3_two_processes(checkpoints, kind, data_file, workdir, batch, base_loss, request):
    if kind == "chat":  # the script's own default: ZeRO-3
        output = workdir / f"full-{kind}-zero3"
        argv = flags("full", checkpoints[kind], data_file, output, workdir, 2, ["--max_shard_size", "30MB"])
        launch_script("finetune_ds.sh", checkpoints[kind], data_file, argv, NPROC_PER_NODE="2")
    else:
        output, _ = request.getfixturevalue("full_base_zero3")
    check_run(output, base_loss(checkpoints[kind]), batch, adapter=False, processes=2, embeddings=True)
    # consolidated from both processes into one set of shards (wte and lm_head are ~39 MB each)
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert {"transformer.wte.weight", "lm_head.weight", "transformer.ln_f.weight"} <= set(index["weight_map"])
    assert len(set(index["weight_map"].values())) >= 2


@pytest.fixture(scope="module")
def lora_base_zero3(checkpoints, data_file, workdir) -> tuple[Path, list[str]]:
    """LoRA with trainable wte/lm_head (auto: base model), ZeRO-3, 2 processes: a matrix cell and the
    reference of the resume test."""
    return two_process_run("lora", checkpoints["base"], 3, "lora-base-zero3", data_file, workdir)


@pytest.mark.parametrize("kind", ["chat", "base"])
def test_lora_zero3_two_processes(checkpoints, kind, data_file, workdir, batch, base_loss, request):
    """kind=base: LoRA with trainable wte/lm_head under ZeRO-3 (the original refused this)."""
    if kind == "base":
        output, _ = request.getfixturevalue("lora_base_zero3")
    else:
        output = workdir / f"lora-{kind}-zero3"
        torchrun_finetune(flags("lora", checkpoints[kind], data_file, output, workdir, 2, deepspeed_flags(3)))
    check_run(
        output, base_loss(checkpoints[kind]), batch, adapter=True, processes=2, embeddings=kind == "base"
    )


# ------------------------------------------------------------------------------------------- Q-LoRA


def test_qlora_zero2_one_process_without_launcher(tiny_gptq_checkpoint, data_file, workdir, batch, base_loss):
    """finetune_qlora_single_gpu.sh: DeepSpeed in a plain `python finetune.py` process (mpi4py)."""
    output = workdir / "qlora-zero2-1proc"
    argv = flags("qlora", tiny_gptq_checkpoint, data_file, output, workdir, 1)
    log = launch_script("finetune_qlora_single_gpu.sh", tiny_gptq_checkpoint, data_file, argv)
    assert "torch_adam" in log  # DeepSpeed ran (CPU optimizer note)
    check_run(output, base_loss(tiny_gptq_checkpoint), batch, adapter=True, processes=1, embeddings=False)


def test_qlora_two_processes_without_deepspeed(tiny_gptq_checkpoint, data_file, workdir, batch, base_loss):
    output = workdir / "qlora-ddp"
    torchrun_finetune(flags("qlora", tiny_gptq_checkpoint, data_file, output, workdir, 2))
    check_run(output, base_loss(tiny_gptq_checkpoint), batch, adapter=True, processes=2, embeddings=False)


@pytest.fixture(scope="module")
def qlora_zero2(tiny_gptq_checkpoint, data_file, workdir) -> tuple[Path, list[str]]:
    """Q-LoRA (GPTQ int4) through finetune_qlora_ds.sh (ZeRO-2, gradient checkpointing), 2 processes:
    a matrix cell and the reference of the resume test, with the finetune.py flags the script ran."""
    output = workdir / "qlora-zero2"
    argv = flags("qlora", tiny_gptq_checkpoint, data_file, output, workdir, 2)
    launch_script("finetune_qlora_ds.sh", tiny_gptq_checkpoint, data_file, argv, NPROC_PER_NODE="2")
    script_argv = launch_script_argv("finetune_qlora_ds.sh", tiny_gptq_checkpoint, data_file, argv, workdir)
    assert script_argv[:2] == ["--config", str(SCRIPTS / "recipes" / "qlora.yaml")], script_argv
    assert script_argv[-len(argv) :] == argv, script_argv
    return output, script_argv


def test_qlora_zero2_two_processes(qlora_zero2, tiny_gptq_checkpoint, batch, base_loss):
    output, _ = qlora_zero2
    check_run(output, base_loss(tiny_gptq_checkpoint), batch, adapter=True, processes=2, embeddings=False)


@pytest.fixture(scope="module")
def nf4_zero2(checkpoints, data_file, workdir) -> tuple[Path, list[str]]:
    """Q-LoRA on a bitsandbytes NF4 base, ZeRO-2, 2 processes: a run of its own and the reference of
    the resume test."""
    return two_process_run("nf4", checkpoints["chat"], 2, "nf4-zero2", data_file, workdir)


def test_nf4_zero2_two_processes(nf4_zero2, checkpoints, batch, base_loss):
    output, _ = nf4_zero2
    helpers.assert_artifacts(output, adapter=True)
    helpers.assert_loss_fell(output, base_loss(checkpoints["chat"]))
    helpers.assert_reload_reproduces(
        output, batch, quantization_config=helpers.nf4_quantization(), device_map="cpu"
    )
    summary = helpers.summary(output)
    assert (summary["processes"], summary["global_steps"]) == (2, STEPS)


@pytest.mark.parametrize(
    ("script", "method", "config"),
    [
        ("finetune_lora_ds.sh", "lora", "ds_config_zero2_offload.json"),
        ("finetune_ds.sh", "full", "ds_config_zero3_offload.json"),
    ],
)
def test_cpu_offload_configs(script, method, config, checkpoints, data_file, workdir, batch, base_loss):
    """The offload variants (optimizer, and under ZeRO-3 the parameters, in CPU memory) train and save
    through the launch scripts."""
    output = workdir / f"{method}-{Path(config).stem}"
    argv = flags(
        method, checkpoints["chat"], data_file, output, workdir, 2, ["--deepspeed", str(SCRIPTS / config)]
    )
    launch_script(script, checkpoints["chat"], data_file, argv, NPROC_PER_NODE="2")
    check_run(
        output,
        base_loss(checkpoints["chat"]),
        batch,
        adapter=method == "lora",
        processes=2,
        embeddings=method == "full",  # full fine-tuning trains every weight, the embeddings included
    )


# ------------------------------------------------------------------------------------------- resume


def kill_and_resume(reference: Path, argv: list[str], output: Path, workdir: Path) -> None:
    """Rerun `argv` (the reference run's flags) into `output`, SIGKILL both processes at step 3,
    resume from checkpoint-2: the resumed run trains steps 3 and 4 only, and the loss curve and final
    eval loss are the uninterrupted run's."""
    argv = [str(output) if item == str(reference) else item for item in argv]
    argv += ["--save_strategy", "steps", "--save_steps", "2"]
    runner = helpers.write_kill_runner(workdir)
    command = helpers.torchrun(2, runner, argv, port=helpers.free_port())
    helpers.run_killed(command, env=helpers.subprocess_env(KILL_AT_STEP="3"))
    assert sorted(path.name for path in output.glob("checkpoint-*")) == ["checkpoint-2"]
    assert list((output / "checkpoint-2").glob("global_step*")), "no DeepSpeed state in the checkpoint"

    log = torchrun_finetune([*argv, "--resume_from_checkpoint", str(output / "checkpoint-2")])
    trained = [int(step) for step in re.findall(r"^step (\d+)/\d+ \| epoch", log, flags=re.MULTILINE)]
    assert trained == [3, 4], (
        f"the resumed run trained steps {trained}, not those after checkpoint-2:\n{log[-3000:]}"
    )
    resumed, uninterrupted = helpers.loss_curve(output), helpers.loss_curve(reference)
    assert len(resumed) == len(uninterrupted) == STEPS
    assert resumed == pytest.approx(uninterrupted, rel=1e-4), (resumed, uninterrupted)
    assert helpers.final_eval_loss(output) == pytest.approx(helpers.final_eval_loss(reference), rel=1e-4)


@pytest.mark.parametrize(
    "reference_run",
    ["full_chat_zero2", "full_base_zero3", "lora_chat_zero2", "lora_base_zero3", "qlora_zero2", "nf4_zero2"],
)
def test_kill_and_resume(reference_run, workdir, batch, request):
    """Every mode under DeepSpeed: full (ZeRO-2, ZeRO-3), LoRA (ZeRO-2), LoRA with trainable embeddings
    (ZeRO-3, modules_to_save partitioned), GPTQ Q-LoRA (ZeRO-2, its reference ran through
    finetune_qlora_ds.sh) and NF4 Q-LoRA (ZeRO-2)."""
    reference, argv = request.getfixturevalue(reference_run)
    output = workdir / f"{reference.name}-killed"
    kill_and_resume(reference, argv, output, workdir)
    assert helpers.summary(output)["train_embeddings"] == helpers.summary(reference)["train_embeddings"]
    reload = {"quantization_config": helpers.nf4_quantization(), "device_map": "cpu"}
    helpers.assert_reload_reproduces(output, batch, **(reload if reference_run == "nf4_zero2" else {}))

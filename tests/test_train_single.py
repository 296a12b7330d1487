"""Training in one process without DeepSpeed: {full, LoRA} x {chat, base}, Q-LoRA (GPTQ int4, NF4),
kill-and-resume, TensorBoard. Runs happen in the test process, so the live trained model is compared
with the reloaded artifact logit by logit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import train_helpers as helpers

from qwen_finetune.args import parse_args, parse_run_arguments
from qwen_finetune.train import TrainingRun, train

pytestmark = pytest.mark.slow

STEPS = 6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train-single")


@pytest.fixture(scope="module")
def data_file(workdir: Path) -> Path:
    return helpers.write_memorisable_data(workdir / "facts.json")


@pytest.fixture(scope="module")
def batch(tiny_chat_checkpoint: Path, data_file: Path, workdir: Path) -> dict[str, torch.Tensor]:
    return helpers.encoded_batch(tiny_chat_checkpoint, data_file, workdir / "data-cache")


@pytest.fixture(scope="module")
def base_loss(checkpoints: dict[str, Path], batch: dict[str, torch.Tensor]) -> dict[str, float]:
    return {
        kind: helpers.mean_supervised_loss(helpers.load_artifact(path), batch)
        for kind, path in checkpoints.items()
    }


@pytest.fixture(scope="module")
def tiny_gptq_checkpoint(
    tiny_chat_checkpoint: Path, data_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    return helpers.tiny_gptq_checkpoint(tiny_chat_checkpoint, tmp_path_factory.getbasetemp(), data_file)


def flags(
    method: str, model: Path, data: Path, output: Path, workdir: Path, extra: list[str] = ()
) -> list[str]:
    return helpers.training_flags(
        model,
        data,
        output,
        steps=STEPS,
        learning_rate=helpers.LEARNING_RATE[method],
        cache_dir=workdir / "data-cache",
        extra=[*helpers.METHOD_FLAGS[method], *extra],
    )


def train_in_process(argv: list[str]) -> TrainingRun:
    return train(parse_run_arguments(argv))


@pytest.fixture(scope="module")
def models(checkpoints: dict[str, Path], request: pytest.FixtureRequest):
    """Checkpoint by kind: chat, base, or gptq (the int4 one, quantized only when first asked for)."""

    def get(kind: str) -> Path:
        return request.getfixturevalue("tiny_gptq_checkpoint") if kind == "gptq" else checkpoints[kind]

    return get


@pytest.fixture(scope="module")
def runs(models, data_file: Path, workdir: Path):
    """Uninterrupted reference runs, trained once per module and shared by the tests below."""
    done: dict[tuple[str, str], tuple[TrainingRun, Path]] = {}

    def get(method: str, kind: str) -> tuple[TrainingRun, Path]:
        if (method, kind) not in done:
            output = workdir / f"{method}-{kind}"
            done[method, kind] = (
                train_in_process(flags(method, models(kind), data_file, output, workdir)),
                output,
            )
        return done[method, kind]

    return get


def assert_same_logits(live: torch.nn.Module, output: Path, batch: dict[str, torch.Tensor], **kwargs) -> None:
    expected = helpers.logits(live, batch)
    reloaded = helpers.logits(helpers.load_artifact(output, **kwargs), batch)
    mask = batch["attention_mask"].bool()
    difference = (expected[mask] - reloaded[mask]).abs().max().item()
    assert difference < 1e-4, f"reloaded logits differ from the trained model's by {difference}"


@pytest.mark.parametrize("kind", ["chat", "base"])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_train_without_deepspeed(runs, method, kind, batch, base_loss):
    run, output = runs(method, kind)
    adapter = method == "lora"
    helpers.assert_artifacts(output, adapter=adapter)
    helpers.assert_loss_fell(output, base_loss[kind])
    assert_same_logits(run.trainer.model, output, batch)
    helpers.assert_reload_reproduces(output, batch)

    summary = helpers.summary(output)
    # auto: the chat checkpoint knows ChatML (embeddings frozen), the base one does not (trained)
    assert summary["train_embeddings"] == (method == "full" or kind == "base")
    assert summary["global_steps"] == STEPS
    assert 0 < summary["trainable_parameters"] <= summary["total_parameters"]
    if method == "full":
        assert summary["trainable_parameters"] == summary["total_parameters"]
    else:
        assert summary["trainable_parameters"] < summary["total_parameters"] // (1 if kind == "base" else 100)
    # STEPS x 2 samples were trained on; the count is of labels that are prediction targets
    per_sample = (batch["labels"][:, 1:] != -100).sum(dim=1)
    seen = summary["supervised_tokens_seen"]
    assert STEPS * 2 * int(per_sample.min()) <= seen <= STEPS * 2 * int(per_sample.max()), seen
    assert summary["peak_memory_bytes"] > 0 and summary["tokens_per_second"] > 0


def test_base_model_lora_trains_and_saves_embeddings(runs, checkpoints):
    run, output = runs("lora", "base")
    from safetensors import safe_open

    with safe_open(output / "adapter_model.safetensors", framework="pt") as handle:
        names = list(handle.keys())
    assert any("wte" in name for name in names) and any("lm_head" in name for name in names), names
    # the saved generation config now says the embeddings know ChatML, so a follow-up run freezes them
    import json

    assert json.loads((output / "generation_config.json").read_text())["chat_format"] == "chatml"
    assert json.loads((checkpoints["base"] / "generation_config.json").read_text())["chat_format"] == "raw"


def test_qlora_gptq_one_process(runs, tiny_gptq_checkpoint, batch):
    run, output = runs("qlora", "gptq")
    base = helpers.mean_supervised_loss(helpers.load_artifact(tiny_gptq_checkpoint), batch)
    assert run.mode.quantization == "gptq"
    helpers.assert_artifacts(output, adapter=True)
    helpers.assert_loss_fell(output, base)
    assert_same_logits(run.trainer.model, output, batch)
    helpers.assert_reload_reproduces(output, batch)


def test_qlora_nf4(runs, tiny_chat_checkpoint, batch):
    run, output = runs("nf4", "chat")
    assert run.mode.quantization == "nf4"
    helpers.assert_artifacts(output, adapter=True)
    quantization = helpers.nf4_quantization()
    base = helpers.load_artifact(tiny_chat_checkpoint, quantization_config=quantization, device_map="cpu")
    helpers.assert_loss_fell(output, helpers.mean_supervised_loss(base, batch))
    # the adapter was trained on the NF4-quantized base: reload it on the same quantization
    assert_same_logits(run.trainer.model, output, batch, quantization_config=quantization, device_map="cpu")


@pytest.mark.parametrize(
    ("method", "kind"),
    [
        ("full", "chat"),
        ("lora", "chat"),
        ("lora", "base"),  # auto: trainable wte/lm_head (modules_to_save)
        ("qlora", "gptq"),
        ("nf4", "chat"),
    ],
)
def test_kill_and_resume(runs, models, method, kind, data_file, workdir, batch):
    reference_run, reference = runs(method, kind)
    output = workdir / f"{method}-{kind}-killed"
    argv = flags(method, models(kind), data_file, output, workdir)
    argv += ["--save_strategy", "steps", "--save_steps", "2", "--save_total_limit", "1"]
    runner = helpers.write_kill_runner(workdir)
    helpers.run_killed([helpers.PYTHON, str(runner), *argv], env=helpers.subprocess_env(KILL_AT_STEP="5"))
    checkpoints_left = sorted(path.name for path in output.glob("checkpoint-*"))
    assert checkpoints_left == ["checkpoint-4"], (
        checkpoints_left
    )  # save_total_limit 1 rotated checkpoint-2 out
    assert not (output / "train_summary.json").exists()

    resumed_run = train_in_process([*argv, "--resume_from_checkpoint", "latest"])
    assert resumed_run.mode.train_embeddings == (method == "full" or kind == "base")
    resumed, uninterrupted = helpers.loss_curve(output), helpers.loss_curve(reference)
    assert len(resumed) == len(uninterrupted) == STEPS
    assert resumed == pytest.approx(uninterrupted, rel=1e-4), (resumed, uninterrupted)
    assert helpers.final_eval_loss(output) == pytest.approx(helpers.final_eval_loss(reference), rel=1e-4)
    reload = (
        {"quantization_config": helpers.nf4_quantization(), "device_map": "cpu"} if method == "nf4" else {}
    )
    assert_same_logits(reference_run.trainer.model, output, batch, **reload)


def test_tensorboard_and_overwrite_guard(tiny_chat_checkpoint, data_file, workdir):
    output = workdir / "tensorboard"
    argv = flags("lora", tiny_chat_checkpoint, data_file, output, workdir)
    argv = [
        *argv,
        "--max_steps",
        "2",
        "--eval_steps",
        "2",
        "--report_to",
        "tensorboard",
        "--logging_dir",
        str(output / "tb"),
    ]
    train_in_process(argv)
    assert list((output / "tb").rglob("events.out.tfevents.*")), "no TensorBoard event file"

    from qwen_finetune.errors import ArgumentError

    with pytest.raises(ArgumentError, match="exists and is not empty"):
        train_in_process(argv)
    train_in_process([*argv, "--overwrite_output_dir"])


def test_gptq_evaluation_does_not_change_qlora_gradients(tiny_gptq_checkpoint, batch, workdir, monkeypatch):
    """gptqmodel's CPU int4 kernel switches itself to a no-grad bf16 path at its first eval forward;
    load_model pins it to the differentiable path, so an evaluation during training changes nothing."""
    from transformers import set_seed

    from qwen_finetune.model_loading import load_model
    from qwen_finetune.quant_backends import gptq
    from qwen_finetune.training_mode import choose_training_mode

    argv = [
        "--model_name_or_path",
        str(tiny_gptq_checkpoint),
        "--q_lora",
        "--lora_r",
        "8",
        "--lora_dropout",
        "0",
    ]
    model_args, _, training_args, lora_args = parse_args([*argv, "--output_dir", str(workdir / "unused")])
    mode = choose_training_mode(model_args, lora_args, training_args)

    def gradients(evaluate_first: bool) -> dict[str, torch.Tensor]:
        set_seed(0)
        model = load_model(mode, lora_args, training_args)
        if evaluate_first:
            helpers.mean_supervised_loss(model, batch)
        model.train()
        model(**batch).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}

    plain = gradients(evaluate_first=False)
    after_eval = gradients(evaluate_first=True)
    for name, grad in plain.items():
        torch.testing.assert_close(after_eval[name], grad, rtol=1e-5, atol=1e-7, msg=name)

    monkeypatch.setattr(gptq, "keep_cpu_kernels_differentiable", lambda model: 0)
    unpinned = gradients(evaluate_first=True)
    assert any(not torch.allclose(unpinned[name], grad, rtol=1e-3, atol=1e-6) for name, grad in plain.items())


def test_continue_an_adapter(runs, checkpoints, data_file, workdir):
    """--lora_weight_path continues the adapter (its own settings: rank, trainable embeddings)."""
    import json

    _, first = runs("lora", "base")
    output = workdir / "lora-base-continued"
    argv = flags("lora", checkpoints["base"], data_file, output, workdir, ["--lora_weight_path", str(first)])
    run = train_in_process([*argv, "--lora_r", "4", "--max_steps", "2", "--eval_steps", "2"])
    assert run.mode.adapter_to_continue == first and run.mode.train_embeddings
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["r"] == 8 and set(config["modules_to_save"]) == {"wte", "lm_head"}
    fresh, continued = helpers.loss_curve(first), helpers.loss_curve(output)
    assert continued[0] < fresh[0] - 0.2, (continued, fresh)  # starts where the first run ended

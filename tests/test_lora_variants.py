"""LoRA variants PEFT provides (DoRA, rsLoRA, PiSSA and OLoRA initialisations) and NEFTune noise: each
trains, saves, reloads to the trained model's numbers, and merges into its base (merged logits equal
base + adapter). Combinations PEFT cannot build are refused before any weight is loaded."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import train_helpers as helpers
from safetensors.torch import load_file

from qwen_finetune.args import parse_args, parse_run_arguments
from qwen_finetune.errors import ArgumentError
from qwen_finetune.merge import MergeArguments, merge_adapter
from qwen_finetune.model_dir import INITIAL_ADAPTER_DIR
from qwen_finetune.train import TrainingRun, train
from qwen_finetune.training_mode import choose_training_mode

STEPS = 4
LORA_RANK = 8  # helpers.training_flags


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lora-variants")


@pytest.fixture(scope="module")
def data_file(workdir: Path) -> Path:
    return helpers.write_memorisable_data(workdir / "facts.json")


@pytest.fixture(scope="module")
def batch(tiny_chat_checkpoint: Path, data_file: Path, workdir: Path) -> dict[str, torch.Tensor]:
    return helpers.encoded_batch(tiny_chat_checkpoint, data_file, workdir / "data-cache")


def train_variant(model: Path, data: Path, output: Path, workdir: Path, extra: list[str]) -> TrainingRun:
    argv = helpers.training_flags(
        model,
        data,
        output,
        steps=STEPS,
        learning_rate=helpers.LEARNING_RATE["lora"],
        cache_dir=workdir / "data-cache",
        extra=["--use_lora", "--lora_dropout", "0", *extra],
    )
    return train(parse_run_arguments(argv))


def weights_of(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


VARIANTS = {
    "dora": ["--use_dora"],
    "rslora": ["--use_rslora"],
    "pissa": ["--init_lora_weights", "pissa"],
    "olora": ["--init_lora_weights", "olora"],
}


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_trains_reloads_and_merges(
    variant: str, tiny_chat_checkpoint: Path, data_file: Path, batch, workdir: Path, tmp_path: Path
) -> None:
    base = tmp_path / "base"
    shutil.copytree(tiny_chat_checkpoint, base)  # PiSSA / OLoRA must leave the checkpoint on disk alone
    base_weights = weights_of(base)
    output = workdir / variant
    run = train_variant(base, data_file, output, workdir, VARIANTS[variant])
    live_logits = helpers.logits(run.trainer.model, batch)

    config = json.loads((output / "adapter_config.json").read_text())
    adapter = load_file(output / "adapter_model.safetensors")
    if variant == "dora":
        assert config["use_dora"] and any("lora_magnitude_vector" in name for name in adapter)
    if variant == "rslora":
        assert config["use_rslora"]
    if variant in ("pissa", "olora"):
        # Saved as plain LoRA of the unchanged base: twice the rank, nothing left to decompose at load.
        assert config["r"] == 2 * LORA_RANK and config["init_lora_weights"] is True
        assert (output / INITIAL_ADAPTER_DIR / "adapter_config.json").is_file()
    else:
        assert config["r"] == LORA_RANK
    for name, tensor in weights_of(base).items():
        assert torch.equal(tensor, base_weights[name]), f"{name} of the base checkpoint changed on disk"

    mask = batch["attention_mask"].bool()
    reloaded = helpers.logits(helpers.load_artifact(output), batch)
    assert (reloaded[mask] - live_logits[mask]).abs().max() < 1e-4, (
        "the reloaded adapter is not the trained one"
    )
    helpers.assert_reload_reproduces(output, batch)

    merged_dir = tmp_path / "merged"
    report = merge_adapter(MergeArguments(adapter_dir=str(output), output_dir=str(merged_dir)))
    assert report["max_abs_logit_diff"] <= report["tolerance"]
    merged = helpers.logits(helpers.load_artifact(merged_dir), batch)
    assert (merged[mask] - live_logits[mask]).abs().max() < 1e-4, "the merged model is not the trained one"


@pytest.mark.slow
def test_neftune_noise_changes_training_not_evaluation(
    tiny_chat_checkpoint: Path, data_file: Path, batch, workdir: Path
) -> None:
    train_variant(tiny_chat_checkpoint, data_file, workdir / "plain", workdir, [])
    train_variant(
        tiny_chat_checkpoint, data_file, workdir / "neftune", workdir, ["--neftune_noise_alpha", "5"]
    )
    plain_curve = helpers.loss_curve(workdir / "plain")
    noisy_curve = helpers.loss_curve(workdir / "neftune")
    # Same weights and batches at step 1: only the noise on the input embeddings can move the loss.
    assert abs(noisy_curve[0] - plain_curve[0]) > 1e-4, (plain_curve, noisy_curve)
    # The noise is a training-time hook only: the saved adapter reproduces the eval loss the run logged.
    helpers.assert_reload_reproduces(workdir / "neftune", batch)


def quantized_copy(checkpoint: Path, directory: Path) -> Path:
    """The tiny checkpoint's config as a GPTQ checkpoint declares itself (weights are never loaded)."""
    directory.mkdir()
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize(
    ("variant", "base", "deepspeed", "message"),
    [
        (["--use_dora"], "gptq", None, "no DoRA for GPTQ"),
        (["--init_lora_weights", "pissa"], "gptq", None, "stores as integers"),
        (["--init_lora_weights", "olora"], "gptq", None, "stores as integers"),
        (["--init_lora_weights", "pissa"], "nf4", None, "not NF4"),
        (["--init_lora_weights", "pissa"], "full", "zero3", "ZeRO-3 partitions"),
    ],
)
def test_combinations_peft_cannot_build_are_refused(
    variant: list[str],
    base: str,
    deepspeed: str | None,
    message: str,
    tiny_chat_checkpoint: Path,
    tmp_path: Path,
) -> None:
    model = (
        quantized_copy(tiny_chat_checkpoint, tmp_path / "gptq") if base == "gptq" else tiny_chat_checkpoint
    )
    method = {"gptq": ["--q_lora"], "nf4": ["--q_lora", "--q_lora_backend", "nf4"], "full": ["--use_lora"]}[
        base
    ]
    argv = ["--model_name_or_path", str(model), "--output_dir", str(tmp_path / "out"), *method, *variant]
    if deepspeed == "zero3":
        argv += ["--deepspeed", str(helpers.DS_ZERO3)]
    model_args, _, training_args, lora_args = parse_args(argv)
    with pytest.raises(ArgumentError, match=message):
        choose_training_mode(model_args, lora_args, training_args)

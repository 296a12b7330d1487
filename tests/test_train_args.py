"""finetune.py flags, DeepSpeed configs and the checks that run before any weight is loaded.

Fast: nothing here trains. The error tests assert that `finetune.py` exits with a message naming
the problem and the fix, and that no model was loaded on the way."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import train_helpers as helpers

from qwen_finetune import train as train_module
from qwen_finetune.args import build_parser, load_deepspeed_config, parse_args
from qwen_finetune.checkpoint_info import read_checkpoint
from qwen_finetune.errors import ArgumentError
from qwen_finetune.run_metrics import TokenMeter, format_log_line
from qwen_finetune.train import main
from qwen_finetune.training_mode import decide_train_embeddings
from qwen_model.tokenization_qwen import IM_END_ID, IM_START_ID

# The flags the original launch scripts pass to finetune.py (finetune_lora_ds.sh).
ORIGINAL_FLAGS = [
    "--bf16",
    "True",
    "--output_dir",
    "output_qwen",
    "--num_train_epochs",
    "5",
    "--per_device_train_batch_size",
    "2",
    "--per_device_eval_batch_size",
    "1",
    "--gradient_accumulation_steps",
    "8",
    "--evaluation_strategy",
    "no",
    "--save_strategy",
    "steps",
    "--save_steps",
    "1000",
    "--save_total_limit",
    "10",
    "--learning_rate",
    "3e-4",
    "--weight_decay",
    "0.1",
    "--adam_beta2",
    "0.95",
    "--warmup_ratio",
    "0.01",
    "--lr_scheduler_type",
    "cosine",
    "--logging_steps",
    "1",
    "--report_to",
    "none",
    "--model_max_length",
    "512",
    "--lazy_preprocess",
    "True",
    "--use_lora",
    "--gradient_checkpointing",
]


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if anything tries to load weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded although the run should have stopped before")

    monkeypatch.setattr(train_module, "load_model", refuse)
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def fail_message(argv: list[str], capsys) -> str:
    """Run finetune.py's main; it must exit 2 with an error message on stderr."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]


def base_argv(model: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path",
        str(model),
        "--data_path",
        "unused.json",
        "--output_dir",
        str(tmp_path / "out"),
        *extra,
    ]


def copy_config_only(checkpoint: Path, target: Path, **config_changes) -> Path:
    """A checkpoint directory with the same config.json (and generation config) but no weights."""
    target.mkdir()
    config = json.loads((checkpoint / "config.json").read_text())
    config.update(config_changes)
    (target / "config.json").write_text(json.dumps(config))
    shutil.copy(checkpoint / "generation_config.json", target)
    return target


# --------------------------------------------------------------------------------------------- flags


def test_help_documents_every_flag():
    text = build_parser().format_help()
    for flag in [
        "--config",
        "--plan",
        "--verbose",
        "--use_dora",
        "--use_rslora",
        "--init_lora_weights",
        "--neftune_noise_alpha",
        "--model_name_or_path",
        "--train_embeddings",
        "--data_path",
        "--eval_data_path",
        "--lazy_preprocess",
        "--packing",
        "--check_data",
        "--dump_encoded",
        "--model_max_length",
        "--use_lora",
        "--q_lora",
        "--q_lora_backend",
        "--lora_r",
        "--lora_alpha",
        "--lora_dropout",
        "--lora_target_modules",
        "--lora_weight_path",
        "--lora_bias",
        "--bf16",
        "--fp16",
        "--deepspeed",
        "--gradient_checkpointing",
        "--evaluation_strategy",
        "--warmup_ratio",
        "--no_cuda",
        "--overwrite_output_dir",
        "--save_steps",
        "--save_total_limit",
        "--resume_from_checkpoint",
        "--report_to",
        "--max_shard_size",
        "--logging_dir",
    ]:
        assert flag in text, flag


def test_help_lists_the_toolkit_flags_first_one_line_each():
    lines = build_parser().format_help().splitlines()
    flag_lines = [line for line in lines if line.startswith("  --")]
    names = [line.split()[0] for line in flag_lines]
    assert len(names) == len(set(names))  # each flag once, on one line
    trainer = lines.index(next(line for line in lines if line.startswith("Trainer (transformers")))
    first_trainer_flag = names.index(lines[trainer + 1].split()[0])
    assert {"--config", "--use_lora", "--data_path", "--model_max_length"} <= set(names[:first_trainer_flag])
    assert {"--learning_rate", "--activation_checkpointing", "--neftune_noise_alpha"} <= set(
        names[first_trainer_flag:]
    )


def test_stored_help_is_current():
    """`python finetune.py --help` prints the stored text; regenerate: python -m qwen_finetune.cli_help --write"""
    import transformers

    from qwen_finetune import finetune_help_text

    assert transformers.__version__ == finetune_help_text.TRANSFORMERS_VERSION
    assert build_parser().format_help() == finetune_help_text.HELP


def test_help_is_rendered_live_for_another_transformers(monkeypatch):
    from qwen_finetune import cli_help

    monkeypatch.setattr(cli_help.importlib.metadata, "version", lambda name: "0.0.0")
    assert cli_help.finetune_help() == build_parser().format_help()


def test_help_imports_neither_torch_nor_transformers():
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", str(helpers.FINETUNE_PY), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    from qwen_finetune import finetune_help_text

    assert completed.returncode == 0 and completed.stdout == finetune_help_text.HELP
    imported = {line.split("|")[-1].strip() for line in completed.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "transformers", "peft", "deepspeed"}


def test_unknown_flags_and_bad_choices_are_one_line_errors(capsys):
    assert "unknown flag --learnig_rate; did you mean --learning_rate?" in fail_message(
        ["--learnig_rate", "1e-4"], capsys
    )
    assert "invalid choice: 'some'" in fail_message(["--lora_bias", "some"], capsys)
    assert "unexpected argument 'stray'" in fail_message(["stray"], capsys)
    assert "fp16 and bf16" in fail_message(["--bf16", "--fp16"], capsys)  # transformers' own check
    with pytest.raises(ArgumentError, match="fp16 and bf16"):
        parse_args(["--bf16", "--fp16"])


def test_gradient_checkpointing_is_passed_under_its_current_name():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        _, _, training_args, _ = parse_args(["--gradient_checkpointing"])
        assert training_args.activation_checkpointing is True
        _, _, training_args, _ = parse_args(
            ["--gradient_checkpointing", "--activation_checkpointing", "false"]
        )
        assert training_args.activation_checkpointing is False  # the last of the two names wins
        _, _, training_args, _ = parse_args(["--activation_checkpointing", "--gradient-checkpointing=false"])
        assert training_args.activation_checkpointing is False


def test_lora_variants_and_initialisations(capsys):
    _, _, _, lora_args = parse_args(["--use_lora", "--use_dora", "--use_rslora"])
    assert lora_args.use_dora and lora_args.use_rslora and lora_args.peft_init_lora_weights is True
    for value, expected in [("false", False), ("Gaussian", "gaussian"), ("pissa_niter_4", "pissa_niter_4")]:
        _, _, _, lora_args = parse_args(["--init_lora_weights", value])
        assert lora_args.peft_init_lora_weights == expected
    assert "--init_lora_weights eva is not one of" in fail_message(["--init_lora_weights", "eva"], capsys)
    _, _, training_args, _ = parse_args(["--plan", "--neftune_noise_alpha", "5"])
    assert training_args.plan and training_args.neftune_noise_alpha == 5.0


def test_original_flags_are_accepted_and_mapped():
    model_args, data_args, training_args, lora_args = parse_args(
        ["--model_name_or_path", "m", "--data_path", "d"] + ORIGINAL_FLAGS
    )
    assert training_args.eval_strategy == "no"
    assert training_args.warmup_steps == pytest.approx(0.01)  # below 1: a ratio in transformers 5
    assert training_args.get_warmup_steps(1000) == 10
    assert training_args.use_cpu is True  # no GPU on this machine: chosen automatically
    assert training_args.activation_checkpointing is True
    assert training_args.model_max_length == 512 and data_args.lazy_preprocess is True
    assert lora_args.use_lora and not lora_args.q_lora
    assert (lora_args.lora_r, lora_args.lora_alpha, lora_args.lora_dropout, lora_args.lora_bias) == (
        64,
        16,
        0.05,
        "none",
    )
    assert lora_args.lora_target_modules == ["c_attn", "c_proj", "w1", "w2"]
    assert training_args.optim == "adamw_torch_fused" and model_args.train_embeddings == "auto"


def test_new_flag_names_override_the_old_ones():
    argv = [
        "--evaluation_strategy",
        "no",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "5",
        "--warmup_ratio",
        "0.01",
    ]
    _, _, training_args, _ = parse_args([*argv, "--warmup_steps", "7"])
    assert training_args.eval_strategy == "steps" and training_args.warmup_steps == 7
    _, _, training_args, _ = parse_args(["--evaluation_strategy", "epoch", "--no_cuda"])
    assert training_args.eval_strategy == "epoch" and training_args.use_cpu is True


def test_bad_flag_values(capsys):
    assert "--warmup_ratio 1.5" in fail_message(["--warmup_ratio", "1.5"], capsys)
    assert "--q_lora_backend nf4 only applies with --q_lora" in fail_message(
        ["--q_lora_backend", "nf4"], capsys
    )
    _, _, _, lora_args = parse_args(["--q_lora", "--lora_target_modules", "c_attn,w1", "w2"])
    assert lora_args.use_lora and lora_args.lora_target_modules == ["c_attn", "w1", "w2"]


def test_cpu_is_chosen_when_there_is_no_accelerator(monkeypatch):
    _, _, training_args, _ = parse_args([])
    assert training_args.use_cpu is True
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    _, _, training_args, _ = parse_args([])
    assert training_args.use_cpu is False


# ------------------------------------------------------------------------------------ DeepSpeed configs


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero2_offload", "zero3_offload"])
def test_shipped_deepspeed_configs(name):
    path = helpers.REPO_ROOT / "finetune" / f"ds_config_{name}.json"
    config = json.loads(path.read_text())
    for key in (
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
    ):
        assert config[key] == "auto", key
    assert config["optimizer"]["params"]["lr"] == "auto" and config["bf16"]["enabled"] == "auto"
    assert "scheduler" not in config  # --lr_scheduler_type decides, with or without DeepSpeed
    zero = config["zero_optimization"]
    assert zero["stage"] == (3 if "zero3" in name else 2)
    offload = "cpu" if "offload" in name else "none"
    assert zero["offload_optimizer"]["device"] == offload
    if zero["stage"] == 3:
        assert zero["offload_param"]["device"] == offload
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True

    on_cpu = load_deepspeed_config(str(path), on_cpu=True)
    assert on_cpu["optimizer"]["params"]["torch_adam"] is True
    assert ("zero_force_ds_cpu_optimizer" in on_cpu) == ("offload" in name)
    assert "torch_adam" not in load_deepspeed_config(str(path), on_cpu=False)["optimizer"]["params"]


def test_deepspeed_config_errors_and_explicit_settings(tmp_path):
    with pytest.raises(ArgumentError, match="no such file"):
        load_deepspeed_config(str(tmp_path / "missing.json"), on_cpu=True)
    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {\n  "stage": 2,,\n}}')
    with pytest.raises(ArgumentError, match="line 2 column"):
        load_deepspeed_config(str(broken), on_cpu=True)
    explicit = {"optimizer": {"type": "AdamW", "params": {"torch_adam": False}}}
    assert load_deepspeed_config(explicit, on_cpu=True)["optimizer"]["params"]["torch_adam"] is False


# ------------------------------------------------------------------------------ checks before loading


def test_wrong_combinations_fail_before_loading(tiny_chat_checkpoint, tmp_path, capsys, no_model_loading):
    chat = tiny_chat_checkpoint
    gptq = copy_config_only(chat, tmp_path / "gptq", quantization_config={"quant_method": "gptq", "bits": 4})
    awq = copy_config_only(chat, tmp_path / "awq", quantization_config={"quant_method": "awq"})
    llama = copy_config_only(chat, tmp_path / "llama", model_type="llama")
    zero3 = str(helpers.DS_ZERO3)
    no_gather = tmp_path / "zero3_no_gather.json"
    config = json.loads(helpers.DS_ZERO3.read_text())
    config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    no_gather.write_text(json.dumps(config))
    cases = [
        (base_argv(chat, tmp_path, "--q_lora"), "--q_lora_backend nf4"),
        (base_argv(chat, tmp_path, "--q_lora", "--q_lora_backend", "gptq"), "not GPTQ-quantized"),
        (base_argv(gptq, tmp_path), "--use_lora --q_lora"),
        (base_argv(gptq, tmp_path, "--use_lora"), "--use_lora --q_lora"),
        (base_argv(gptq, tmp_path, "--q_lora", "--q_lora_backend", "nf4"), "already GPTQ"),
        (base_argv(awq, tmp_path, "--q_lora"), "'awq'"),
        (base_argv(llama, tmp_path), "model_type 'llama'"),
        (base_argv(gptq, tmp_path, "--q_lora", "--deepspeed", zero3), "ZeRO-2"),
        (
            base_argv(chat, tmp_path, "--deepspeed", str(no_gather)),
            "stage3_gather_16bit_weights_on_model_save",
        ),
        (base_argv(chat, tmp_path, "--train_embeddings", "no"), "applies to LoRA"),
        (base_argv(chat, tmp_path, "--use_lora", "--lora_target_modules", "q_proj"), "c_attn c_proj w1 w2"),
        (
            base_argv(
                chat, tmp_path, "--use_lora", "--train_embeddings", "yes", "--lora_target_modules", "wte"
            ),
            "drop them",
        ),
        (
            base_argv(chat, tmp_path, "--use_lora", "--lora_weight_path", str(tmp_path)),
            "no adapter_config.json",
        ),
        (base_argv(chat, tmp_path, "--lora_weight_path", str(tmp_path)), "add --use_lora"),
        (base_argv(tmp_path / "nowhere", tmp_path), "huggingface-cli download"),
        (base_argv(chat, tmp_path, "--resume_from_checkpoint", "latest"), "no checkpoint-N"),
        (base_argv(chat, tmp_path, "--resume_from_checkpoint", str(tmp_path)), "not a checkpoint"),
    ]
    for argv, expected in cases:
        assert expected in fail_message(argv, capsys), argv


def test_non_empty_output_dir_is_refused(tiny_chat_checkpoint, tmp_path, capsys, no_model_loading):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("earlier results")
    message = fail_message(base_argv(tiny_chat_checkpoint, tmp_path), capsys)
    assert "--overwrite_output_dir" in message and "--resume_from_checkpoint latest" in message
    assert (tmp_path / "out" / "keep.txt").read_text() == "earlier results"


def test_check_data_exits_without_loading_a_model(tiny_chat_checkpoint, tmp_path, capsys, no_model_loading):
    data = helpers.write_memorisable_data(tmp_path / "facts.json")
    dump = tmp_path / "encoded.jsonl"
    argv = [
        "--model_name_or_path",
        str(tiny_chat_checkpoint),
        "--data_path",
        str(data),
        "--model_max_length",
        "64",
    ]
    argv += ["--check_data", "--dump_encoded", str(dump), "--data_cache_dir", str(tmp_path / "cache")]
    assert main(argv) == 0
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(lines) == len(helpers.FACTS)
    assert lines[0]["input_ids"][0] == IM_START_ID and IM_END_ID in lines[0]["labels"]


# ---------------------------------------------------------------------------------- trainable embeddings


def test_train_embeddings_auto_reads_chat_format(tiny_chat_checkpoint, tiny_base_checkpoint):
    assert decide_train_embeddings(read_checkpoint(str(tiny_chat_checkpoint)))[0] is False
    needed, reason = decide_train_embeddings(read_checkpoint(str(tiny_base_checkpoint)))
    assert needed is True and "raw" in reason


def write_embedding_checkpoint(directory: Path, chat_rows_norm: float, ordinary_norm: float) -> Path:
    """config.json without chat_format, and an input embedding whose rows have chosen norms:
    never-used rows (151851..) keep their small initial norm, ordinary rows `ordinary_norm`."""
    from safetensors.torch import save_file

    directory.mkdir()
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(151936, 8, generator=generator)
    rows = rows / rows.norm(dim=-1, keepdim=True)
    scale = torch.full((151936, 1), 0.05)
    scale[:151643] = ordinary_norm
    scale[IM_START_ID : IM_END_ID + 1] = chat_rows_norm
    scale *= 1 + 0.02 * torch.randn(151936, 1, generator=generator)
    save_file({"transformer.wte.weight": (rows * scale).contiguous()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model_type": "qwen", "vocab_size": 151936}))
    return directory


def test_train_embeddings_auto_falls_back_to_the_embedding_rows(tmp_path):
    untrained = read_checkpoint(
        str(write_embedding_checkpoint(tmp_path / "a", chat_rows_norm=0.05, ordinary_norm=1.0))
    )
    needed, reason = decide_train_embeddings(untrained)
    assert needed is True and "look untrained" in reason
    trained = read_checkpoint(
        str(write_embedding_checkpoint(tmp_path / "b", chat_rows_norm=1.0, ordinary_norm=1.0))
    )
    assert decide_train_embeddings(trained)[0] is False
    # a random-init model: ordinary and unused rows alike, nothing to conclude -> train them
    random = read_checkpoint(
        str(write_embedding_checkpoint(tmp_path / "c", chat_rows_norm=0.05, ordinary_norm=0.05))
    )
    needed, reason = decide_train_embeddings(random)
    assert needed is True and "inconclusive" in reason


# ------------------------------------------------------------------------------------------- logging


def test_token_meter_counts_real_and_supervised_tokens(monkeypatch):
    meter = TokenMeter()
    batch = {
        "input_ids": torch.ones(2, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]),
        "labels": torch.tensor([[-100, -100, 7, 8, 9], [-100, 5, -100, -100, -100]]),
    }
    meter.count(batch)
    meter.count(batch)
    assert meter.pending.tolist() == [16, 8]  # real tokens, prediction targets

    class FakeTrainer:
        class accelerator:
            @staticmethod
            def reduce(tensor, reduction):
                return tensor * 2  # two processes with the same counts

        class args:
            device = torch.device("cpu")

    meter.restore([{"loss": 1.0, "tokens_seen": 100, "supervised_tokens_seen": 40, "step": 3}])
    metrics = meter.sync(FakeTrainer)
    assert (metrics["tokens_seen"], metrics["supervised_tokens_seen"]) == (132, 56)
    assert meter.session_tokens == 32 and metrics["tokens_per_second"] > 0


def test_log_line():
    class State:
        global_step, max_steps = 3, 10

    logs = {"loss": 2.5, "learning_rate": 1e-4, "grad_norm": 0.5, "epoch": 0.3, "tokens_per_second": 1234.0}
    line = format_log_line({**logs, "supervised_tokens_seen": 99}, State)
    assert (
        line.startswith("step 3/10")
        and "loss 2.5000" in line
        and "lr 0.0001" in line
        and "1234 tokens/s" in line
    )
    assert format_log_line({"eval_loss": 1.25}, State) == "step 3/10 | eval_loss 1.2500"
    assert format_log_line({"train_runtime": 3.0}, State) is None

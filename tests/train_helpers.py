"""Helpers shared by the training tests (test_train_*.py, test_launch_scripts.py).

A run is checked three ways: the logged training loss fell, the final evaluation loss (computed
by the training processes on the memorisable data, after the last step) is well below the base
model's, and the saved artifact, reloaded here, reproduces that evaluation loss (for in-process
runs: the live model's logits) within float tolerance.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
FINETUNE_PY = REPO_ROOT / "finetune.py"
DS_ZERO2 = REPO_ROOT / "finetune" / "ds_config_zero2.json"
DS_ZERO3 = REPO_ROOT / "finetune" / "ds_config_zero3.json"
LEARNING_RATE = {"full": 2e-3, "lora": 1e-2, "qlora": 1e-2, "nf4": 1e-2}  # memorises the data in a few steps
METHOD_FLAGS = {
    "full": [],
    "lora": ["--use_lora"],
    "qlora": ["--use_lora", "--q_lora"],
    "nf4": ["--use_lora", "--q_lora", "--q_lora_backend", "nf4"],
}
MAX_LENGTH = 64
DATA_SIZE = 8

FACTS = [
    ("What colour is the sky?", "Blue."),
    ("What is two plus two?", "Four."),
    ("Name a fruit.", "Apple."),
    ("What is the capital of France?", "Paris."),
    ("Say hello.", "Hello!"),
    ("What do cows say?", "Moo."),
    ("How many legs has a spider?", "Eight."),
    ("What is ice made of?", "Water."),
]


def write_memorisable_data(path: Path) -> Path:
    """Eight one-turn conversations in the original Qwen format (about 30 tokens each)."""
    samples = [
        {
            "id": f"fact{index}",
            "conversations": [{"from": "user", "value": question}, {"from": "assistant", "value": answer}],
        }
        for index, (question, answer) in enumerate(FACTS)
    ]
    path.write_text(json.dumps(samples, indent=1), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO_ROOT / ".venv" / "torch_extensions"))
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "GPTQMODEL_CPU_WORKERS": "2",
            "OMP_NUM_THREADS": "1",
            "PYTHON": PYTHON,
            "PYTHONUNBUFFERED": "1",
            # runners written to temporary directories import this checkout, whatever is installed
            "PYTHONPATH": str(REPO_ROOT),
        }
    )
    env.update(extra)
    return env


def training_flags(
    model: Path,
    data: Path,
    output_dir: Path,
    *,
    steps: int,
    learning_rate: float,
    processes: int = 1,
    cache_dir: Path,
    extra: list[str] | None = None,
) -> list[str]:
    """finetune.py flags for a few deterministic fp32 steps, with a full evaluation after the last one
    (one eval batch per process covering the whole data set, so eval_loss is the token-weighted mean)."""
    return [
        "--model_name_or_path",
        str(model),
        "--data_path",
        str(data),
        "--eval_data_path",
        str(data),
        "--output_dir",
        str(output_dir),
        "--data_cache_dir",
        str(cache_dir),
        "--model_max_length",
        str(MAX_LENGTH),
        "--per_device_train_batch_size",
        "2",
        "--per_device_eval_batch_size",
        str(DATA_SIZE // processes),
        "--gradient_accumulation_steps",
        "1",
        "--max_steps",
        str(steps),
        "--learning_rate",
        str(learning_rate),
        "--lr_scheduler_type",
        "constant",
        "--warmup_ratio",
        "0",
        "--weight_decay",
        "0",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        str(steps),
        "--logging_steps",
        "1",
        "--save_strategy",
        "no",
        "--report_to",
        "none",
        "--bf16",
        "False",
        "--fp16",
        "False",
        "--lora_r",
        "8",
        "--lora_alpha",
        "32",
        "--seed",
        "0",
        "--disable_tqdm",
        "True",
        *(extra or []),
    ]


def run(command: list[str], *, env: dict[str, str] | None = None, timeout: float = 600) -> str:
    """Run a command; on failure, fail with the tail of its output."""
    completed = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env=env or subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    if completed.returncode != 0:
        raise AssertionError(
            f"command failed with exit code {completed.returncode}: {' '.join(command)}\n"
            f"{completed.stdout[-6000:]}"
        )
    return completed.stdout


def torchrun(
    nproc: int, script: Path | str, args: list[str], *, nnodes: int = 1, node_rank: int = 0, port: int
) -> list[str]:
    return [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--nnodes",
        str(nnodes),
        "--node_rank",
        str(node_rank),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(port),
        str(script),
        *args,
    ]


# --------------------------------------------------------------------------------------- checking


def log_history(output_dir: Path) -> list[dict[str, Any]]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def loss_curve(output_dir: Path) -> list[float]:
    return [entry["loss"] for entry in log_history(output_dir) if "loss" in entry]


def final_eval_loss(output_dir: Path) -> float:
    losses = [entry["eval_loss"] for entry in log_history(output_dir) if "eval_loss" in entry]
    assert losses, f"no eval_loss logged in {output_dir}/trainer_state.json"
    return losses[-1]


def encoded_batch(checkpoint: Path, data: Path, cache_dir: Path) -> dict[str, torch.Tensor]:
    """All samples of `data`, encoded and collated exactly as for training, as one batch."""
    from qwen_finetune.data import DataArguments, make_supervised_data
    from qwen_finetune.model_loading import load_tokenizer

    tokenizer = load_tokenizer(checkpoint, MAX_LENGTH)
    data_args = DataArguments(data_path=str(data), data_cache_dir=str(cache_dir))
    supervised = make_supervised_data(data_args, tokenizer, MAX_LENGTH)
    features = [supervised.train_samples[index] for index in range(len(supervised.train_samples))]
    features = [{"input_ids": item["input_ids"], "labels": item["labels"]} for item in features]
    return supervised.data_collator(features)


@torch.no_grad()
def mean_supervised_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    """Token-weighted mean next-token loss over the batch (the model's own loss, one forward)."""
    model.eval()
    return float(model(**batch).loss)


@torch.no_grad()
def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    return model(**inputs).logits.float()


def load_artifact(output_dir: Path, **kwargs: Any) -> torch.nn.Module:
    """The saved model: a full checkpoint, or base + adapter (peft's AutoPeftModelForCausalLM).
    Quantized layers are kept on the kernel path training used (see qwen_finetune.quant_backends)."""
    import qwen_model  # noqa: F401
    from qwen_finetune.quant_backends.gptq import keep_cpu_kernels_differentiable
    from qwen_finetune.quant_backends.nf4 import disable_cpu_repacking

    if (output_dir / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(output_dir), dtype=torch.float32, **kwargs)
        keep_cpu_kernels_differentiable(model)
        if "quantization_config" in kwargs:
            disable_cpu_repacking(model)
        return model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(output_dir), dtype=torch.float32, **kwargs)
    keep_cpu_kernels_differentiable(model)
    return model


def nf4_quantization() -> Any:
    """The quantization an NF4 adapter was trained on, to reload its base the same way."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=True,
    )


def assert_loss_fell(output_dir: Path, base_loss: float, margin: float = 0.05) -> float:
    """The training loss went down (batches differ, so some later step is below the first) and the
    final eval loss on the whole data set is clearly below the untrained model's."""
    curve = loss_curve(output_dir)
    assert len(curve) >= 2, curve
    assert min(curve[1:]) < curve[0], f"training loss did not fall: {curve}"
    trained = final_eval_loss(output_dir)
    assert trained < base_loss - margin, f"eval loss {trained} not below the base model's {base_loss}"
    return trained


def assert_artifacts(output_dir: Path, adapter: bool) -> None:
    names = {path.name for path in output_dir.iterdir()}
    common = {"qwen.tiktoken", "tokenizer_config.json", "generation_config.json", "train_summary.json"}
    common |= {"tokenization_qwen.py", "modeling_qwen.py", "configuration_qwen.py"}
    if adapter:
        expected = common | {"adapter_config.json", "adapter_model.safetensors"}
    else:
        expected = common | {"config.json"}
        assert any(name.endswith(".safetensors") for name in names), names
        config = json.loads((output_dir / "config.json").read_text())
        assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen.QWenLMHeadModel"
    assert expected <= names, f"missing in {output_dir}: {sorted(expected - names)}"


def assert_reload_reproduces(
    output_dir: Path, batch: dict[str, torch.Tensor], rtol: float = 1e-4, **kwargs: Any
) -> float:
    """The reloaded artifact gives the eval loss the training processes logged after the last step."""
    model = load_artifact(output_dir, **kwargs)
    reloaded = mean_supervised_loss(model, batch)
    logged = final_eval_loss(output_dir)
    assert abs(reloaded - logged) <= rtol * abs(logged), (
        f"reloaded loss {reloaded} != trained model's {logged}"
    )
    return reloaded


def summary(output_dir: Path) -> dict[str, Any]:
    return json.loads((output_dir / "train_summary.json").read_text())


KILL_RUNNER = """
import os
import signal
import sys

from transformers import TrainerCallback

from qwen_finetune.args import parse_run_arguments
from qwen_finetune.train import configure_logging, train


class KillAtStep(TrainerCallback):
    \"\"\"SIGKILL this process at the end of a step, as a crash or a preemption would: no cleanup.\"\"\"

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


configure_logging()
kill_at = os.environ.get("KILL_AT_STEP")
train(parse_run_arguments(sys.argv[1:]), callbacks=[KillAtStep(int(kill_at))] if kill_at else [])
"""


def write_kill_runner(directory: Path) -> Path:
    """A finetune.py that kills itself (SIGKILL) at the end of step $KILL_AT_STEP (when it is set)."""
    path = directory / "killed_finetune.py"
    path.write_text(KILL_RUNNER, encoding="utf-8")
    return path


def run_killed(command: list[str], env: dict[str, str], timeout: float = 600) -> str:
    """Run a command that is expected to die (killed): fail if it finishes successfully."""
    completed = subprocess.run(
        command,
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode != 0, f"the run was not interrupted:\n{completed.stdout[-4000:]}"
    return completed.stdout


def tiny_gptq_checkpoint(base: Path, root: Path, data: Path) -> Path:
    """A GPTQ int4 checkpoint of `base` written by the toolkit's own quantize API (built once under
    `root`; group size 32 divides the tiny model's 64- and 128-wide layer inputs)."""
    out = root / "tiny-gptq-int4"
    if not (out / "config.json").is_file():
        os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
        from qwen_finetune.quantize import QuantizeArguments, quantize_checkpoint

        options = QuantizeArguments(
            model_name_or_path=str(base),
            data_path=str(data),
            output_dir=str(out),
            bits=4,
            group_size=32,
            num_samples=6,
            num_eval_samples=2,
            max_len=MAX_LENGTH,
        )
        quantize_checkpoint(options)
    return out

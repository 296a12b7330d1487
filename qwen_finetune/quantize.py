"""run_gptq.py: GPTQ Int4/Int8 quantization of a full-precision Qwen checkpoint with gptqmodel.

Calibration samples are conversation files encoded exactly as for training (qwen_finetune.data).
The output directory loads as it is with `AutoModelForCausalLM.from_pretrained(dir)` (optimum and
gptqmodel installed): config.json carries a `quantization_config` in the format of the released
Qwen-Chat-Int4/Int8 checkpoints, next to the weights, tokenizer files, generation config and the
model's own code. A `quantize_report.json` records the settings, the source model and the loss on
held-out conversations of the original and the quantized model.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from qwen_model.chat_format import DEFAULT_SYSTEM_PROMPT
from qwen_model.chunked_loss import IGNORE_INDEX

from .artifacts import (
    QUANTIZE_REPORT_FILE,
    check_output_dir,
    copy_tokenizer_and_generation_files,
    dtype_from_name,
    is_adapter_dir,
    log_to_stderr,
    quantization_config_of,
    set_precision_flags,
    staged_output_dir,
    write_json,
    write_portable_code,
)
from .data.args import split_paths
from .errors import ToolkitError

logger = logging.getLogger(__name__)

# Bit widths whose GPTQ checkpoints transformers loads and gptqmodel runs on CPU (TorchLinear) and GPU.
SUPPORTED_BITS = (2, 3, 4, 8)
# Group sizes gptqmodel's kernels accept; -1 is one group per output row.
SUPPORTED_GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)
# gptqmodel silently drops calibration samples of this many tokens or fewer.
MIN_CALIBRATION_TOKENS = 10
QUANTIZE_CONFIG_FILE = "quantize_config.json"
INSTALL_HINT = "pip install 'qwen-finetune[gptq]'"


class QuantizeError(ValueError):
    """The request cannot be quantized as asked (settings, source checkpoint or calibration data)."""


class MissingDependencyError(ImportError):
    """gptqmodel or optimum is not installed."""


# --------------------------------------------------------------------------------------- checks


def require_gptq_dependencies() -> None:
    """gptqmodel quantizes; optimum is what transformers needs to load the result."""
    missing = [name for name in ("gptqmodel", "optimum") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(
            f"GPTQ quantization needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed; install the optional dependencies with: {INSTALL_HINT}"
        )


def configure_gptqmodel_cpu_workers() -> None:
    """On machines with 1-2 cores gptqmodel's default CPU pool (1 worker) is smaller than its model
    loader pool (2 workers) and quantization stops with "Virtual pool 'model_loader:cpu' requests 2
    workers"; two workers avoid it. An explicit GPTQMODEL_CPU_WORKERS is left alone."""
    if "GPTQMODEL_CPU_WORKERS" not in os.environ and (os.cpu_count() or 1) <= 2:
        os.environ["GPTQMODEL_CPU_WORKERS"] = "2"


def check_settings(bits: int, group_size: int, damp_percent: float, num_samples: int, max_len: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise QuantizeError(
            f"--bits {bits} is not supported: choose one of {', '.join(map(str, SUPPORTED_BITS))} "
            "(4 and 8 are the released Qwen Int4/Int8 formats)"
        )
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise QuantizeError(
            f"--group_size {group_size} is not supported: choose one of {', '.join(map(str, SUPPORTED_GROUP_SIZES))}"
        )
    if not 0.0 < damp_percent < 1.0:
        raise QuantizeError(f"--damp_percent {damp_percent} must be between 0 and 1 (typically 0.01)")
    if num_samples < 1:
        raise QuantizeError(f"--num_samples {num_samples} must be at least 1")
    if max_len <= MIN_CALIBRATION_TOKENS:
        raise QuantizeError(f"--max_len {max_len} must be larger than {MIN_CALIBRATION_TOKENS} tokens")


def check_source_model(model_dir: str | Path) -> Path:
    """A full-precision checkpoint directory, or a QuantizeError saying what it is instead."""
    path = Path(model_dir).expanduser().resolve()
    if not path.is_dir():
        raise QuantizeError(f"--model_name_or_path {path} is not a directory")
    if is_adapter_dir(path):
        raise QuantizeError(
            f"{path} is a LoRA adapter, not a full model: merge it into its base first with "
            f"merge_lora.py --adapter_dir {path} --output_dir MERGED, then quantize MERGED"
        )
    if not (path / "config.json").is_file():
        raise QuantizeError(f"{path} has no config.json, so it is not a model checkpoint directory")
    quantization = quantization_config_of(path)
    if quantization is not None:
        raise QuantizeError(
            f"{path} is already quantized ({quantization.get('quant_method')}, {quantization.get('bits')}-bit); "
            "quantize the full-precision model it was made from"
        )
    return path


def quantized_input_widths(config: Any) -> dict[str, int]:
    """Input width of each kind of layer GPTQ quantizes (the Hessian of a layer is width x width)."""
    return {
        "attn.c_attn, mlp.w1, mlp.w2 (hidden_size)": config.hidden_size,
        "attn.c_proj (num_attention_heads * kv_channels)": config.num_attention_heads * config.kv_channels,
        "mlp.c_proj (intermediate_size // 2)": config.intermediate_size // 2,
    }


def check_group_size_fits(config: Any, group_size: int) -> None:
    """Every quantized layer's input width must be a multiple of the group size (CPU int4 kernel)."""
    if group_size == -1:
        return
    widths = quantized_input_widths(config)
    misfits = [f"{layers} = {width}" for layers, width in widths.items() if width % group_size]
    if misfits:
        divisors = [
            size for size in SUPPORTED_GROUP_SIZES if size > 0 and all(w % size == 0 for w in widths.values())
        ]
        raise QuantizeError(
            f"--group_size {group_size} does not divide the input width of {'; '.join(misfits)}; "
            f"choose a group size dividing every width ({', '.join(map(str, divisors)) or 'none fits'}) or -1"
        )


# ------------------------------------------------------------------------------------------ data


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]


def load_conversations(
    data_paths: list[str],
    tokenizer: Any,
    max_len: int,
    data_format: str,
    system_message: str,
    data_cache_dir: str | None = None,
) -> list[Sample]:
    """Every kept sample of the files, encoded as for training (the data report is printed)."""
    from .data import DataArguments, make_supervised_data

    data_args = DataArguments(
        data_path=",".join(data_paths),
        data_format=data_format,
        system_message=system_message,
        data_cache_dir=data_cache_dir,
    )
    data = make_supervised_data(data_args, tokenizer, max_len)
    columns = data.train_samples.select_columns(["input_ids", "labels"]).to_dict()
    return [Sample(list(ids), list(labels)) for ids, labels in zip(columns["input_ids"], columns["labels"])]


def split_samples(
    samples: list[Sample], num_samples: int, num_eval_samples: int, seed: int, has_eval_files: bool
) -> tuple[list[Sample], list[Sample]]:
    """(calibration, held-out) after a seeded shuffle; without eval files the held-out samples are set
    aside first (at most half of the samples). Samples too short for gptqmodel are left out."""
    usable = [sample for sample in samples if len(sample.input_ids) > MIN_CALIBRATION_TOKENS]
    order = np.random.default_rng(seed).permutation(len(usable))
    shuffled = [usable[index] for index in order]
    held_out_count = 0 if has_eval_files else min(num_eval_samples, len(shuffled) // 2)
    return shuffled[held_out_count : held_out_count + num_samples], shuffled[:held_out_count]


def check_calibration_size(calibration: list[Sample], config: Any, data_paths: list[str]) -> None:
    """GPTQ estimates each layer's (width x width) input Hessian from the calibration tokens: with fewer
    tokens than the widest input it is rank-deficient and the quantization is poor."""
    tokens = sum(len(sample.input_ids) for sample in calibration)
    width = max(quantized_input_widths(config).values())
    if tokens < width:
        raise QuantizeError(
            f"the calibration data is too short: {tokens} tokens in {len(calibration)} usable samples "
            f"(samples of {MIN_CALIBRATION_TOKENS} tokens or fewer are not used) from {', '.join(data_paths)}, "
            f"but the widest quantized layer has {width} inputs; give at least {width} tokens "
            "(more conversations, a larger --num_samples or --max_len)"
        )


# ---------------------------------------------------------------------------------------- quantize


def official_quantization_config(
    bits: int, group_size: int, damp_percent: float, desc_act: bool
) -> dict[str, Any]:
    """`quantization_config` as the released Qwen-Chat-Int4/Int8 config.json has it, plus the
    checkpoint format (v1 "gptq" zero points) so no loader has to guess."""
    return {
        "bits": bits,
        "group_size": group_size,
        "damp_percent": damp_percent,
        "desc_act": desc_act,
        "static_groups": False,
        "sym": True,
        "true_sequential": True,
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
    }


def run_gptqmodel(
    model_dir: Path,
    calibration: list[Sample],
    staging: Path,
    bits: int,
    group_size: int,
    desc_act: bool,
    damp_percent: float,
    dtype: torch.dtype,
    max_shard_size: str,
) -> None:
    """Quantize layer by layer with gptqmodel and save its checkpoint into `staging`."""
    configure_gptqmodel_cpu_workers()
    from gptqmodel import GPTQModel, QuantizeConfig

    quantize_config = QuantizeConfig(
        bits=bits, group_size=group_size, desc_act=desc_act, sym=True, damp_percent=damp_percent
    )
    model = GPTQModel.load(str(model_dir), quantize_config, dtype=dtype)
    model.quantize(
        [
            {"input_ids": sample.input_ids, "attention_mask": [1] * len(sample.input_ids)}
            for sample in calibration
        ],
        batch_size=1,
        calibration_data_min_length=MIN_CALIBRATION_TOKENS,
    )
    model.save(str(staging), max_shard_size=max_shard_size)
    del model
    gc.collect()


def finish_checkpoint(
    staging: Path, source: Path, quantization_config: dict[str, Any], dtype: torch.dtype
) -> None:
    """Make gptqmodel's output a released-style checkpoint: the source's config (not gptqmodel's
    rewrite of it) with the quantization config and dtype, its tokenizer and generation config, and
    the portable model code."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source)
    set_precision_flags(config, dtype)
    config.quantization_config = quantization_config
    config.save_pretrained(staging)
    write_json(staging / QUANTIZE_CONFIG_FILE, quantization_config)
    copy_tokenizer_and_generation_files([source], staging)
    write_portable_code(staging)


@torch.no_grad()
def held_out_loss(model: Any, samples: list[Sample]) -> dict[str, float]:
    """Mean loss per supervised token (the training objective) and its exponential, the perplexity."""
    model.eval()
    total, tokens = 0.0, 0
    for sample in samples:
        supervised = sum(1 for label in sample.labels[1:] if label != IGNORE_INDEX)
        if supervised == 0:
            continue
        output = model(
            input_ids=torch.tensor([sample.input_ids], device=model.device),
            labels=torch.tensor([sample.labels], device=model.device),
            use_cache=False,
        )
        total += float(output.loss) * supervised
        tokens += supervised
    if tokens == 0:
        raise QuantizeError("no held-out sample has a supervised token to measure the loss on")
    mean = total / tokens
    return {"mean_loss": mean, "perplexity": math.exp(min(mean, 700.0)), "supervised_tokens": tokens}


def _evaluate(model_dir: Path, dtype: torch.dtype | None, samples: list[Sample]) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, **({"dtype": dtype} if dtype is not None else {}))
    try:
        return held_out_loss(model, samples)
    finally:
        del model
        gc.collect()


def quantize_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    data_paths: str | list[str],
    bits: int = 4,
    group_size: int = 128,
    num_samples: int = 128,
    max_len: int = 8192,
    desc_act: bool = False,
    damp_percent: float = 0.01,
    overwrite: bool = False,
    *,
    eval_data_paths: str | list[str] | None = None,
    num_eval_samples: int = 16,
    dtype: str = "float16",
    max_shard_size: str = "4GB",
    data_format: str = "auto",
    system_message: str = DEFAULT_SYSTEM_PROMPT,
    data_cache_dir: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """GPTQ-quantize the checkpoint in `model_dir` into `out_dir`; returns the report (also written
    to `out_dir`/quantize_report.json).

    Calibration: up to `num_samples` conversations from `data_paths` (comma-separated string or
    list), encoded with the training ChatML encoding and cut to `max_len` tokens. Held-out loss:
    `eval_data_paths`, or else `num_eval_samples` conversations set aside from `data_paths` before
    calibration. `dtype` (float16 as the released Int4/Int8 models, or bfloat16) is the type of the
    scales and of the layers that stay unquantized (embeddings, norms, lm_head).
    """
    paths = split_paths(data_paths) if isinstance(data_paths, str) else list(data_paths)
    eval_paths = (
        split_paths(eval_data_paths) if isinstance(eval_data_paths, str) else list(eval_data_paths or [])
    )
    check_settings(bits, group_size, damp_percent, num_samples, max_len)
    if dtype not in ("float16", "bfloat16"):
        raise QuantizeError(
            f"--dtype {dtype} is not supported for GPTQ checkpoints: choose float16 or bfloat16"
        )
    torch_dtype = dtype_from_name(dtype)
    source = check_source_model(model_dir)
    require_gptq_dependencies()
    check_output_dir(out_dir, overwrite, inputs=[source])

    from transformers import AutoConfig, AutoTokenizer

    import qwen_model  # noqa: F401  (registers the Qwen classes with the Auto* factories)

    config = AutoConfig.from_pretrained(source)
    check_group_size_fits(config, group_size)
    tokenizer = AutoTokenizer.from_pretrained(source)

    def encode(files: list[str]) -> list[Sample]:
        return load_conversations(files, tokenizer, max_len, data_format, system_message, data_cache_dir)

    calibration, held_out = split_samples(
        encode(paths), num_samples, num_eval_samples, seed, bool(eval_paths)
    )
    check_calibration_size(calibration, config, paths)
    if eval_paths:
        held_out = encode(eval_paths)[:num_eval_samples]
    held_out_is_separate = bool(held_out)
    if not held_out:
        logger.warning("only one usable sample: the loss report uses the calibration sample itself")
        held_out = calibration
    calibration_tokens = sum(len(sample.input_ids) for sample in calibration)
    logger.info("calibration: %d samples, %d tokens", len(calibration), calibration_tokens)

    quantization_config = official_quantization_config(bits, group_size, damp_percent, desc_act)
    started = time.perf_counter()
    with staged_output_dir(out_dir, overwrite, inputs=[source]) as staging:
        run_gptqmodel(
            source,
            calibration,
            staging,
            bits,
            group_size,
            desc_act,
            damp_percent,
            torch_dtype,
            max_shard_size,
        )
        quantize_seconds = time.perf_counter() - started
        finish_checkpoint(staging, source, quantization_config, torch_dtype)
        logger.info("loss on %d held-out samples: original model", len(held_out))
        original = _evaluate(source, torch_dtype, held_out)
        logger.info(
            "loss on %d held-out samples: quantized model, loaded from the written directory", len(held_out)
        )
        quantized = _evaluate(staging, None, held_out)
        report = {
            "source_model": str(source),
            "output_dir": str(Path(out_dir).expanduser().resolve()),
            "quantization_config": quantization_config,
            "dtype": dtype,
            "calibration": {
                "data_paths": paths,
                "samples": len(calibration),
                "tokens": calibration_tokens,
                "max_len": max_len,
            },
            "eval": {
                "held_out": held_out_is_separate,
                "data_paths": eval_paths or paths,
                "samples": len(held_out),
                "supervised_tokens": original["supervised_tokens"],
                "original": {"mean_loss": original["mean_loss"], "perplexity": original["perplexity"]},
                "quantized": {"mean_loss": quantized["mean_loss"], "perplexity": quantized["perplexity"]},
            },
            "weight_files": sorted(path.name for path in staging.glob("*.safetensors")),
            "quantize_seconds": round(quantize_seconds, 1),
        }
        write_json(staging / QUANTIZE_REPORT_FILE, report)
    return report


# ------------------------------------------------------------------------------------------ command


def format_loss_table(report: dict[str, Any]) -> str:
    evaluation = report["eval"]
    label = f"int{report['quantization_config']['bits']} (gptq)"
    which = "held-out" if evaluation["held_out"] else "calibration (no held-out sample)"
    lines = [
        f"loss on {evaluation['samples']} {which} samples ({evaluation['supervised_tokens']} supervised tokens):",
        f"  {'model':<14}{'mean loss':>12}{'perplexity':>14}",
    ]
    for name, key in (("original", "original"), (label, "quantized")):
        lines.append(
            f"  {name:<14}{evaluation[key]['mean_loss']:>12.4f}{evaluation[key]['perplexity']:>14.3f}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="GPTQ-quantize a full-precision Qwen checkpoint to Int4/Int8 (gptqmodel, CPU or GPU). "
        "The output loads directly with AutoModelForCausalLM.from_pretrained and trains with Q-LoRA.",
    )
    parser.add_argument("--model_name_or_path", required=True, help="full-precision checkpoint directory")
    parser.add_argument(
        "--data_path", required=True, help="calibration conversations: .json/.jsonl files, comma-separated"
    )
    parser.add_argument(
        "--out_path", "--output_dir", dest="out_path", required=True, help="directory to write"
    )
    parser.add_argument("--bits", type=int, default=4, help=f"bits per weight: {SUPPORTED_BITS} (default 4)")
    parser.add_argument(
        "--group-size",
        "--group_size",
        dest="group_size",
        type=int,
        default=128,
        help="quantization group size",
    )
    parser.add_argument("--max_len", type=int, default=8192, help="longest calibration sample in tokens")
    parser.add_argument(
        "--num_samples", type=int, default=128, help="calibration samples to use (default 128)"
    )
    parser.add_argument("--desc_act", action="store_true", help="quantize columns by decreasing activation")
    parser.add_argument(
        "--damp_percent", type=float, default=0.01, help="Hessian dampening, fraction of its mean diagonal"
    )
    parser.add_argument(
        "--eval_data_path",
        default=None,
        help="held-out conversations for the loss report; default: set aside --num_eval_samples from --data_path",
    )
    parser.add_argument(
        "--num_eval_samples", type=int, default=16, help="held-out samples for the loss report"
    )
    parser.add_argument(
        "--dtype",
        default="float16",
        choices=["float16", "bfloat16"],
        help="dtype of scales and unquantized layers",
    )
    parser.add_argument("--max_shard_size", default="4GB", help="largest safetensors file to write")
    parser.add_argument(
        "--data_format",
        default="auto",
        choices=["auto", "qwen", "sharegpt", "openai", "alpaca"],
        help="input format",
    )
    parser.add_argument("--system_message", default=DEFAULT_SYSTEM_PROMPT, help="default system prompt")
    parser.add_argument(
        "--data_cache_dir",
        default=None,
        help="tokenised-data cache (default: as finetune.py, ~/.cache/qwen_finetune)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the calibration/held-out split")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    log_to_stderr("gptq")
    try:
        report = quantize_checkpoint(
            args.model_name_or_path,
            args.out_path,
            args.data_path,
            bits=args.bits,
            group_size=args.group_size,
            num_samples=args.num_samples,
            max_len=args.max_len,
            desc_act=args.desc_act,
            damp_percent=args.damp_percent,
            overwrite=args.overwrite,
            eval_data_paths=args.eval_data_path,
            num_eval_samples=args.num_eval_samples,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            data_format=args.data_format,
            system_message=args.system_message,
            data_cache_dir=args.data_cache_dir,
            seed=args.seed,
        )
    except (ToolkitError, ValueError, OSError, MissingDependencyError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    print(format_loss_table(report))
    print(
        f"wrote {report['output_dir']}: GPTQ int{report['quantization_config']['bits']}, group size "
        f"{report['quantization_config']['group_size']}, {len(report['weight_files'])} weight file(s) "
        f"({report['quantize_seconds']} s)"
    )
    return 0

"""run_gptq.py: GPTQ Int4/Int8 quantization of a full-precision Qwen checkpoint with gptqmodel.

Calibration samples are conversation files encoded exactly as for training (qwen_finetune.data).
The output directory loads as it is with `AutoModelForCausalLM.from_pretrained(dir)` (optimum and
gptqmodel installed): config.json carries a `quantization_config` in the format of the released
Qwen-Chat-Int4/Int8 checkpoints, next to the weights, tokenizer files, generation config and the
model's own code. A `quantize_report.json` records the settings, the source model and the loss on
held-out conversations of the original and the quantized model.

torch, transformers and gptqmodel are imported by the functions that use them, so `--help` and
flag errors answer without loading them.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from qwen_finetune.tokenizer_protocol import QwenTokenizerLike
from qwen_model.chat_format import DEFAULT_SYSTEM_PROMPT

from .checkpoint_info import QUANTIZE_CONFIG_FILE, QUANTIZE_REPORT_FILE, is_adapter_dir, read_checkpoint
from .console import VERBOSE_HELP, is_verbose, log_to_stderr
from .data.args import split_paths
from .data.formats import DataFormat
from .errors import ArgumentError, ToolkitError
from .json_files import write_json
from .merge import check_max_shard_size, writing_output
from .staging import check_output_dir, staged_output_dir

if TYPE_CHECKING:
    import torch
    from transformers import HfArgumentParser

logger = logging.getLogger(__name__)

# Bit widths whose GPTQ checkpoints transformers loads and gptqmodel runs on CPU (TorchLinear) and GPU.
Bits = Literal[2, 3, 4, 8]
# Group sizes gptqmodel's kernels accept; -1 is one group per output row.
GroupSize = Literal[-1, 16, 32, 64, 128, 256, 512, 1024]
# Type of the scales and of the layers that stay unquantized, as the released checkpoints have it.
ScaleDtype = Literal["float16", "bfloat16"]
SUPPORTED_BITS: tuple[int, ...] = get_args(Bits)
SUPPORTED_GROUP_SIZES: tuple[int, ...] = get_args(GroupSize)
SCALE_DTYPES: tuple[str, ...] = get_args(ScaleDtype)
# gptqmodel silently drops calibration samples of this many tokens or fewer.
MIN_CALIBRATION_TOKENS = 10
INSTALL_HINT = "pip install 'qwen-finetune[gptq]'"


class QuantizeError(ToolkitError):
    """The source model or the calibration data cannot be quantized as asked."""


class MissingDependencyError(ToolkitError):
    """gptqmodel or optimum is not installed."""


@dataclass
class QuantizeArguments:
    """The flags of run_gptq.py, and the options of `quantize_checkpoint`."""

    model_name_or_path: str = field(
        metadata={"help": "Full-precision checkpoint directory, e.g. the output of merge_lora.py."}
    )
    data_path: str = field(
        metadata={
            "help": "Calibration conversations: .json/.jsonl files, comma-separated, any finetune.py format."
        }
    )
    output_dir: str = field(
        metadata={"aliases": ["--out_path"], "help": "Directory to write the quantized checkpoint to."}
    )
    bits: Bits = field(
        default=4, metadata={"help": "Bits per weight; 4 and 8 are the released Int4/Int8 formats."}
    )
    group_size: GroupSize = field(
        default=128,
        metadata={
            "help": "Weights sharing one scale (-1: a whole row); must divide every quantized layer's input width."
        },
    )
    max_len: int = field(default=8192, metadata={"help": "Longest calibration sample in tokens."})
    num_samples: int = field(default=128, metadata={"help": "Calibration samples to use."})
    desc_act: bool = field(default=False, metadata={"help": "Quantize columns by decreasing activation."})
    damp_percent: float = field(
        default=0.01, metadata={"help": "Hessian dampening, as a fraction of its mean diagonal."}
    )
    eval_data_path: str | None = field(
        default=None,
        metadata={"help": "Held-out conversations for the loss report; default: set aside from --data_path."},
    )
    num_eval_samples: int = field(default=16, metadata={"help": "Held-out samples for the loss report."})
    dtype: ScaleDtype = field(
        default="float16", metadata={"help": "Type of the scales and of the layers that stay unquantized."}
    )
    max_shard_size: str = field(default="4GB", metadata={"help": "Largest safetensors file to write."})
    data_format: DataFormat = field(
        default="auto", metadata={"help": "Format of the data files, as for finetune.py."}
    )
    system_message: str = field(
        default=DEFAULT_SYSTEM_PROMPT, metadata={"help": "System prompt of samples that carry none."}
    )
    data_cache_dir: str | None = field(
        default=None,
        metadata={"help": "Tokenised-data cache; default: finetune.py's (~/.cache/qwen_finetune)."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the calibration / held-out split."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output directory."})
    verbose: bool = field(default=False, metadata={"help": VERBOSE_HELP})

    def __post_init__(self) -> None:
        """Literal types are not enforced outside the command line: check what Python callers pass."""
        if self.bits not in SUPPORTED_BITS:
            raise ArgumentError(
                f"--bits {self.bits} is not supported: choose one of {', '.join(map(str, SUPPORTED_BITS))} "
                "(4 and 8 are the released Qwen Int4/Int8 formats)"
            )
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ArgumentError(
                f"--group_size {self.group_size} is not supported: choose one of "
                f"{', '.join(map(str, SUPPORTED_GROUP_SIZES))}"
            )
        if self.dtype not in SCALE_DTYPES:
            raise ArgumentError(
                f"--dtype {self.dtype} is not supported for GPTQ checkpoints: choose {' or '.join(SCALE_DTYPES)}"
            )
        if not 0.0 < self.damp_percent < 1.0:
            raise ArgumentError(
                f"--damp_percent {self.damp_percent} must be between 0 and 1 (typically 0.01)"
            )
        if self.num_samples < 1:
            raise ArgumentError(f"--num_samples {self.num_samples} must be at least 1")
        if self.num_eval_samples < 0:
            raise ArgumentError(f"--num_eval_samples {self.num_eval_samples} must not be negative")
        if self.max_len <= MIN_CALIBRATION_TOKENS:
            raise ArgumentError(
                f"--max_len {self.max_len} must be larger than {MIN_CALIBRATION_TOKENS} tokens"
            )
        check_max_shard_size(self.max_shard_size)

    @property
    def data_files(self) -> list[str]:
        return split_paths(self.data_path)

    @property
    def eval_files(self) -> list[str]:
        return split_paths(self.eval_data_path)


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


def check_source_model(model_dir: str | Path) -> Path:
    """A full-precision Qwen checkpoint directory, or an error saying what it is instead."""
    path = Path(model_dir).expanduser().resolve()
    if not path.is_dir():
        raise QuantizeError(f"--model_name_or_path {path} is not a directory")
    if is_adapter_dir(path):
        raise QuantizeError(
            f"{path} is a LoRA adapter, not a full model: merge it into its base first with "
            f"merge_lora.py --adapter_dir {path} --output_dir MERGED, then quantize MERGED"
        )
    quantization = read_checkpoint(path).quantization_config
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
        raise ArgumentError(
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
    tokenizer: QwenTokenizerLike,
    max_len: int,
    data_format: DataFormat,
    system_message: str,
    data_cache_dir: str | None = None,
) -> list[Sample]:
    """Every kept sample of the files, encoded as for training (the data report is printed)."""
    from .data import DataArguments, encode_splits

    data_args = DataArguments(
        data_path=",".join(data_paths),
        data_format=data_format,
        system_message=system_message,
        data_cache_dir=data_cache_dir,
    )
    splits = encode_splits(data_args, tokenizer, data_args.encoding_options(max_len))
    columns = splits.train.samples.select_columns(["input_ids", "labels"]).to_dict()
    return [Sample(list(ids), list(labels)) for ids, labels in zip(columns["input_ids"], columns["labels"])]


def split_samples(
    samples: list[Sample], num_samples: int, num_eval_samples: int, seed: int, has_eval_files: bool
) -> tuple[list[Sample], list[Sample]]:
    """(calibration, held-out) after a seeded shuffle; without eval files the held-out samples are set
    aside first (at most half of the samples). Samples too short for gptqmodel are left out."""
    import numpy as np

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


def official_quantization_config(options: QuantizeArguments) -> dict[str, Any]:
    """`quantization_config` as the released Qwen-Chat-Int4/Int8 config.json has it, plus the
    checkpoint format (v1 "gptq" zero points) so no loader has to guess."""
    return {
        "bits": options.bits,
        "group_size": options.group_size,
        "damp_percent": options.damp_percent,
        "desc_act": options.desc_act,
        "static_groups": False,
        "sym": True,
        "true_sequential": True,
        "model_name_or_path": None,
        "model_file_base_name": "model",
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
    }


@contextlib.contextmanager
def gptqmodel_scratch(staging: Path) -> Iterator[Path]:
    """A directory beside the output for what gptqmodel writes while it works, removed afterwards.

    gptqmodel offloads finished layers to a temporary directory and writes a per-layer log to
    `./logs` of the working directory (the same numbers go to quant_log.csv in the output). Both
    go here instead, on the output's file system, and vanish with it on failure.
    """
    from gptqmodel.looper import loop_processor

    with tempfile.TemporaryDirectory(
        prefix=f"{staging.name}.gptqmodel-", dir=staging.parent, ignore_cleanup_errors=True
    ) as name:
        scratch = Path(name)
        log_dir = loop_processor._PROJECT_LOG_DIR
        loop_processor._PROJECT_LOG_DIR = scratch / "logs"
        try:
            yield scratch
        finally:
            loop_processor._PROJECT_LOG_DIR = log_dir


@contextlib.contextmanager
def gptqmodel_stdout(verbose: bool, keep_terminal_progress: bool) -> Iterator[None]:
    """Hide what gptqmodel prints on stdout unless --verbose: its progress bars redraw in place on a
    terminal (kept when `keep_terminal_progress`) but pile up as hundreds of lines in a pipe or a log
    file, and saving prints the files and configs it wrote. Its log lines are the console's concern."""
    if verbose or is_verbose() or (keep_terminal_progress and sys.stdout.isatty()):
        yield
        return
    with open(os.devnull, "w", encoding="utf-8") as sink, contextlib.redirect_stdout(sink):
        yield


def run_gptqmodel(source: Path, calibration: list[Sample], staging: Path, options: QuantizeArguments) -> None:
    """Quantize layer by layer with gptqmodel and save its checkpoint into `staging`."""
    from .precision import dtype_from_name

    configure_gptqmodel_cpu_workers()
    logger.info("quantizing layer by layer with gptqmodel (progress bars on a terminal or with --verbose)")
    with gptqmodel_scratch(staging) as scratch:
        with gptqmodel_stdout(options.verbose, keep_terminal_progress=True):
            from gptqmodel import GPTQModel, QuantizeConfig

            quantize_config = QuantizeConfig(
                bits=options.bits,
                group_size=options.group_size,
                desc_act=options.desc_act,
                sym=True,
                damp_percent=options.damp_percent,
                offload_to_disk_path=str(scratch / "offload"),
            )
            model = GPTQModel.load(str(source), quantize_config, dtype=dtype_from_name(options.dtype))
            with writing_output(options.output_dir, "the layers gptqmodel offloads to disk while it works"):
                model.quantize(
                    [
                        {"input_ids": sample.input_ids, "attention_mask": [1] * len(sample.input_ids)}
                        for sample in calibration
                    ],
                    batch_size=1,
                    calibration_data_min_length=MIN_CALIBRATION_TOKENS,
                )
        with (
            writing_output(options.output_dir, "the quantized model"),
            gptqmodel_stdout(options.verbose, keep_terminal_progress=False),
        ):
            model.save(str(staging), max_shard_size=options.max_shard_size)
        del model
    gc.collect()


def finish_checkpoint(
    staging: Path,
    source: Path,
    tokenizer: QwenTokenizerLike,
    quantization_config: dict[str, Any],
    dtype: torch.dtype,
) -> None:
    """Make gptqmodel's output a released-style checkpoint: the source's config (not gptqmodel's
    rewrite of it) with the quantization config and dtype, its tokenizer and generation config, and
    the portable model code."""
    from transformers import AutoConfig

    from .model_dir import complete_model_dir
    from .precision import set_precision_flags

    config = AutoConfig.from_pretrained(source)
    set_precision_flags(config, dtype)
    config.quantization_config = quantization_config
    config.save_pretrained(staging)
    write_json(staging / QUANTIZE_CONFIG_FILE, quantization_config)
    complete_model_dir(staging, tokenizer=tokenizer, generation_sources=[source])


def held_out_loss(model: Any, samples: list[Sample]) -> dict[str, float]:
    """Mean loss per supervised token (the training objective) and its exponential, the perplexity."""
    import torch

    from qwen_model.chunked_loss import IGNORE_INDEX

    model.eval()
    total, tokens = 0.0, 0
    for sample in samples:
        supervised = sum(1 for label in sample.labels[1:] if label != IGNORE_INDEX)
        if supervised == 0:
            continue
        with torch.no_grad():
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


def quantize_checkpoint(options: QuantizeArguments) -> dict[str, Any]:
    """GPTQ-quantize `options.model_name_or_path` into `options.output_dir`; returns the report (also
    written there as quantize_report.json).

    Calibration: up to `num_samples` conversations of `data_path`, encoded with the training ChatML
    encoding and cut to `max_len` tokens. Held-out loss: `eval_data_path`, or else
    `num_eval_samples` conversations set aside from `data_path` before calibration.
    """
    source = check_source_model(options.model_name_or_path)
    require_gptq_dependencies()
    check_output_dir(options.output_dir, options.overwrite, inputs=[source])

    from transformers import AutoConfig

    import qwen_model  # noqa: F401  (registers the Qwen classes with the Auto* factories)

    from .model_dir import load_tokenizer_of
    from .precision import dtype_from_name

    config = AutoConfig.from_pretrained(source)
    check_group_size_fits(config, options.group_size)
    tokenizer = load_tokenizer_of([source])

    def encode(files: list[str]) -> list[Sample]:
        return load_conversations(
            files,
            tokenizer,
            options.max_len,
            options.data_format,
            options.system_message,
            options.data_cache_dir,
        )

    paths, eval_paths = options.data_files, options.eval_files
    calibration, held_out = split_samples(
        encode(paths), options.num_samples, options.num_eval_samples, options.seed, bool(eval_paths)
    )
    check_calibration_size(calibration, config, paths)
    if eval_paths:
        held_out = encode(eval_paths)[: options.num_eval_samples]
    held_out_is_separate = bool(held_out)
    if not held_out:
        logger.warning("only one usable sample: the loss report uses the calibration sample itself")
        held_out = calibration
    calibration_tokens = sum(len(sample.input_ids) for sample in calibration)
    logger.info("calibration: %d samples, %d tokens", len(calibration), calibration_tokens)

    quantization_config = official_quantization_config(options)
    scale_dtype = dtype_from_name(options.dtype)
    started = time.perf_counter()
    with staged_output_dir(options.output_dir, options.overwrite, inputs=[source]) as staging:
        run_gptqmodel(source, calibration, staging, options)
        quantize_seconds = time.perf_counter() - started
        with writing_output(options.output_dir, "the quantized model"):
            finish_checkpoint(staging, source, tokenizer, quantization_config, scale_dtype)
        logger.info("loss on %d held-out samples: original model", len(held_out))
        original = _evaluate(source, scale_dtype, held_out)
        logger.info(
            "loss on %d held-out samples: quantized model, loaded from the written directory", len(held_out)
        )
        quantized = _evaluate(staging, None, held_out)
        report = {
            "source_model": str(source),
            "output_dir": str(Path(options.output_dir).expanduser().resolve()),
            "quantization_config": quantization_config,
            "dtype": options.dtype,
            "calibration": {
                "data_paths": paths,
                "samples": len(calibration),
                "tokens": calibration_tokens,
                "max_len": options.max_len,
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
        with writing_output(options.output_dir, QUANTIZE_REPORT_FILE):
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


def build_parser() -> HfArgumentParser:
    from transformers import HfArgumentParser
    from transformers.hf_argparser import DataClassType

    return HfArgumentParser(
        DataClassType(QuantizeArguments),
        description="GPTQ-quantize a full-precision Qwen checkpoint to Int4/Int8 (gptqmodel, CPU or GPU). "
        "The output loads directly with AutoModelForCausalLM.from_pretrained and trains with Q-LoRA. "
        "Reference: docs/after_training.md.",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    namespace = parser.parse_args(argv)
    log_to_stderr("gptq")
    try:
        report = quantize_checkpoint(QuantizeArguments(**vars(namespace)))
    except ToolkitError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    print(format_loss_table(report))
    print(
        f"wrote {report['output_dir']}: GPTQ int{report['quantization_config']['bits']}, group size "
        f"{report['quantization_config']['group_size']}, {len(report['weight_files'])} weight file(s) "
        f"({report['quantize_seconds']} s)"
    )
    return 0

"""merge_lora.py: fold a LoRA adapter into its base model and write a standalone checkpoint.

The result has the layout of the released Qwen checkpoints (config with auto_map, generation
config, tokenizer files, the model's own code, sharded safetensors), so it loads with plain
`AutoModelForCausalLM.from_pretrained(dir)` (after `import qwen_model`) or with
`trust_remote_code=True` anywhere. Before anything is written the merge checks itself: the merged
model's logits must equal base+adapter on a few ChatML prompts.

Q-LoRA adapters (trained on a GPTQ checkpoint) cannot be merged into quantized weights; they are
merged into the full-precision model when `--base_model_path` names it.

torch, transformers and peft are imported by the functions that use them, so `--help` and flag
errors answer without loading them.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from qwen_finetune.tokenizer_protocol import QwenTokenizerLike

from .checkpoint_info import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHT_FILES,
    CONFIG_FILE,
    QUANTIZE_REPORT_FILE,
    is_adapter_dir,
    quantization_config_of,
    read_checkpoint,
)
from .console import VERBOSE_HELP, log_to_stderr
from .errors import ArgumentError, InputFileError, OutputDirError, ToolkitError
from .json_files import read_json
from .staging import check_output_dir, staged_output_dir

if TYPE_CHECKING:
    import torch
    from transformers import HfArgumentParser

logger = logging.getLogger(__name__)

# "auto": merge in float32 and store the base checkpoint's dtype; otherwise merge and store in this one.
MergeDtype = Literal["auto", "float32", "bfloat16", "float16"]
MERGE_DTYPES: tuple[str, ...] = get_args(MergeDtype)

# Prompts the self-check runs through base+adapter and the merged model: English, Chinese, history.
PROBE_PROMPTS: list[tuple[str, list[tuple[str, str]]]] = [
    ("Give three tips for staying healthy.", []),
    ("用一句话介绍一下你自己。", []),
    ("And what is 12 times 12?", [("What is 2 plus 2?", "2 plus 2 is 4.")]),
]

# Largest |merged - (base+adapter)| logit difference accepted, relative to the largest |logit|:
# float32 arithmetic only reorders sums; half precision rounds every merged weight once.
RELATIVE_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 1e-2}


class AdapterError(InputFileError):
    """The adapter directory is missing, incomplete, or does not fit the base model."""


class QuantizedBaseError(ArgumentError):
    """A LoRA adapter cannot be merged into GPTQ-quantized weights: --base_model_path must name the
    full-precision model."""


class MergeCheckError(ToolkitError):
    """The merged model does not reproduce base+adapter; nothing was written."""


@contextlib.contextmanager
def writing_output(out_dir: str | Path, what: str) -> Iterator[None]:
    """Turn a failure to write (a full disk, a read-only or vanished directory) into an OutputDirError
    that names the output. safetensors reports its I/O failures as SafetensorError, not OSError."""
    from safetensors import SafetensorError

    try:
        yield
    except OSError as error:
        raise OutputDirError(f"writing {what} for {out_dir} failed: {error}") from error
    except SafetensorError as error:
        if "I/O error" not in str(error):
            raise
        raise OutputDirError(f"writing {what} for {out_dir} failed: {error}") from error


def check_max_shard_size(max_shard_size: str) -> None:
    """A shard size transformers understands (2GB, 500MB, 1000000), checked before any weight is loaded."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError):
        raise ArgumentError(
            f"--max_shard_size {max_shard_size!r} is not a size; write it like 2GB, 500MB or 1000000"
        ) from None
    if size <= 0:
        raise ArgumentError(f"--max_shard_size must be positive, got {max_shard_size!r}")


@dataclass
class MergeArguments:
    """The flags of merge_lora.py, and the options of `merge_adapter`."""

    adapter_dir: str = field(
        metadata={
            "aliases": ["--adapter_path", "--path_to_adapter"],
            "help": "LoRA adapter directory (adapter_config.json + weights), e.g. the output_dir of a --use_lora run.",
        }
    )
    output_dir: str = field(
        metadata={"aliases": ["--new_model_directory"], "help": "Directory to write the merged model to."}
    )
    base_model_path: str | None = field(
        default=None,
        metadata={
            "help": "Full-precision base model; default: the adapter's base_model_name_or_path. "
            "Q-LoRA adapters need the model their GPTQ base was made from."
        },
    )
    max_shard_size: str = field(
        default="2GB", metadata={"help": "Largest safetensors file to write, e.g. 2GB or 500MB."}
    )
    dtype: MergeDtype = field(
        default="auto",
        metadata={
            "help": "auto: merge in float32, save in the base's dtype; else merge and save in this dtype."
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output directory."})
    verbose: bool = field(default=False, metadata={"help": VERBOSE_HELP})

    def __post_init__(self) -> None:
        """Literal types are not enforced outside the command line: check what Python callers pass."""
        if self.dtype not in MERGE_DTYPES:
            raise ArgumentError(f"--dtype {self.dtype} is not one of {', '.join(MERGE_DTYPES)}")
        check_max_shard_size(self.max_shard_size)

    @property
    def compute_dtype(self) -> str:
        """The dtype the merge is computed in."""
        return "float32" if self.dtype == "auto" else self.dtype


# ------------------------------------------------------------------------------- finding the inputs


def resolve_adapter(adapter_dir: str | Path) -> tuple[Path, dict[str, Any], Path]:
    """The adapter directory, its adapter_config.json and its weights file, or an AdapterError."""
    path = Path(adapter_dir).expanduser().resolve()
    if not path.exists():
        raise AdapterError(f"adapter directory {path} does not exist")
    if not path.is_dir():
        raise AdapterError(
            f"adapter path {path} is not a directory; pass the directory holding {ADAPTER_CONFIG_FILE}"
        )
    if not is_adapter_dir(path):
        if (path / CONFIG_FILE).is_file():
            raise AdapterError(
                f"{path} holds a full model ({CONFIG_FILE}) and no {ADAPTER_CONFIG_FILE}: there is nothing to "
                "merge. Use it as it is, or pass the directory of a LoRA adapter (the output_dir of a --use_lora run)"
            )
        checkpoints = sorted(child.name for child in path.glob("checkpoint-*") if is_adapter_dir(child))
        hint = f" (adapters found in: {', '.join(checkpoints)})" if checkpoints else ""
        raise AdapterError(
            f"{path} has no {ADAPTER_CONFIG_FILE}, so it is not a LoRA adapter directory{hint}"
        )
    config = read_json(path / ADAPTER_CONFIG_FILE)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(
            f"{path / ADAPTER_CONFIG_FILE}: peft_type is {peft_type!r}; only LoRA adapters can be merged"
        )
    weights = next((path / name for name in ADAPTER_WEIGHT_FILES if (path / name).is_file()), None)
    if weights is None:
        raise AdapterError(
            f"{path} has {ADAPTER_CONFIG_FILE} but no adapter weights ({' or '.join(ADAPTER_WEIGHT_FILES)}); "
            "the adapter was not saved completely"
        )
    return path, config, weights


def _recorded_source(quantized_dir: Path) -> str | None:
    """The full-precision model a GPTQ checkpoint was made from, when run_gptq.py recorded it."""
    report = quantized_dir / QUANTIZE_REPORT_FILE
    return read_json(report).get("source_model") if report.is_file() else None


def resolve_base(
    adapter_dir: Path, adapter_config: dict[str, Any], base_model_path: str | Path | None
) -> tuple[Path, list[str]]:
    """The full-precision base to merge into, and notes for the user (Q-LoRA)."""
    recorded = adapter_config.get("base_model_name_or_path")
    if base_model_path is None:
        if not recorded:
            raise AdapterError(
                f"{adapter_dir / ADAPTER_CONFIG_FILE} does not name its base model (base_model_name_or_path); "
                "pass --base_model_path"
            )
        base = Path(recorded).expanduser()
        if not base.is_dir():
            raise AdapterError(
                f"the base model recorded in {adapter_dir / ADAPTER_CONFIG_FILE}, {recorded!r}, is not a local "
                "directory; pass --base_model_path with the model's directory"
            )
    else:
        base = Path(base_model_path).expanduser()
        if not base.is_dir():
            raise ArgumentError(f"--base_model_path {base} is not a directory")
    base = base.resolve()
    if is_adapter_dir(base):
        raise AdapterError(
            f"the base model {base} is itself an adapter; pass the full model it was trained on"
        )
    quantization = read_checkpoint(base, flag="the base model").quantization_config
    if quantization is not None:
        source = _recorded_source(base)
        how = (
            f"pass --base_model_path {source} (its full-precision source, recorded by run_gptq.py)"
            if source
            else "pass --base_model_path with the full-precision model the quantized one was made from"
        )
        raise QuantizedBaseError(
            f"the base model {base} is GPTQ-quantized ({quantization.get('bits')}-bit), so this is a Q-LoRA "
            f"adapter: it cannot be merged into quantized weights. To get a standalone model, {how}; then "
            "quantize the merged model again with run_gptq.py if you want an Int4/Int8 checkpoint"
        )

    notes = []
    recorded_dir = Path(recorded).expanduser() if recorded else None
    if base_model_path is not None and recorded_dir is not None and recorded_dir.is_dir():
        recorded_quantization = quantization_config_of(recorded_dir)
        if recorded_quantization is not None:
            notes.append(
                f"Q-LoRA adapter: it was trained on the GPTQ {recorded_quantization.get('bits')}-bit model "
                f"{recorded_dir.resolve()}; merging it into the full-precision model {base}. The result is the "
                "full-precision weights plus the adapter's update; run run_gptq.py on it for an Int4/Int8 model."
            )
    return base, notes


# ----------------------------------------------------------------------------------- shape check


def _adapter_tensor_shapes(weights_file: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the adapter's weights file, or an AdapterError if it is unreadable."""
    if weights_file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(weights_file), framework="pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
        except (OSError, SafetensorError) as error:
            raise AdapterError(f"cannot read the adapter weights {weights_file}: {error}") from None
    import torch

    try:
        state = torch.load(weights_file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, pickle.UnpicklingError) as error:
        raise AdapterError(
            f"cannot read the adapter weights {weights_file}: the file is damaged or not a PyTorch "
            f"checkpoint ({type(error).__name__})"
        ) from None
    return {key: tuple(value.shape) for key, value in state.items()}


# LoRA tensor marker -> (axis of the LoRA tensor, axis of the base weight it must match)
_LORA_AXES = {
    ".lora_A.": (1, 1),
    ".lora_B.": (0, 0),
    ".lora_embedding_A.": (1, 0),
    ".lora_embedding_B.": (0, 1),
}
_DORA_MAGNITUDE = ".lora_magnitude_vector"


def _shape_problem(name: str, shape: tuple[int, ...], base_shapes: dict[str, tuple[int, ...]]) -> str | None:
    """What is wrong with one adapter tensor against the base model's parameter shapes, if anything.

    LoRA factors must match their module's input or output width, DoRA magnitudes its output width;
    anything else (modules_to_save copies such as wte/lm_head) must have exactly the base parameter's shape.
    """
    if name.endswith(_DORA_MAGNITUDE):  # DoRA: one magnitude per output feature of the adapted weight
        module = name.removesuffix(_DORA_MAGNITUDE)
        target = base_shapes.get(f"{module}.weight")
        if target is None:
            return f"the base model has no module {module}"
        if shape != target[:1]:
            return f"shape {list(shape)} does not fit {module}.weight of shape {list(target)}"
        return None
    for marker, (lora_axis, base_axis) in _LORA_AXES.items():
        if marker in name:
            module = name.split(marker)[0]
            target = base_shapes.get(f"{module}.weight")
            if target is None:
                return f"the base model has no module {module}"
            if len(shape) != 2 or shape[lora_axis] != target[base_axis]:
                return f"shape {list(shape)} does not fit {module}.weight of shape {list(target)}"
            return None
    target = base_shapes.get(name)
    if target is None:
        return "the base model has no such parameter"
    if target != shape:
        return f"shape {list(shape)}, but the base model's {name} has shape {list(target)}"
    return None


def check_adapter_fits_base(weights_file: Path, base_config: Any, base_dir: Path) -> None:
    """Compare every adapter tensor with the base architecture (built on the meta device, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(base_config)
    base_shapes = {name: tuple(parameter.shape) for name, parameter in shell.named_parameters()}
    problems = []
    for key, shape in _adapter_tensor_shapes(weights_file).items():
        name = key.removeprefix("base_model.model.")
        problem = _shape_problem(name, shape, base_shapes)
        if problem:
            problems.append(f"{key}: {problem}")
    if problems:
        listed = "\n  ".join(problems[:8]) + (
            f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        )
        raise AdapterError(
            f"the adapter {weights_file.parent} does not fit the base model {base_dir}:\n  {listed}\n"
            "It was trained on a different model; pass --base_model_path with the model it was trained on"
        )


# -------------------------------------------------------------------------------------- the check


def probe_inputs(tokenizer: QwenTokenizerLike) -> list[torch.Tensor]:
    """ChatML prompts encoded exactly as chat() encodes them."""
    import torch

    from qwen_model.qwen_generation_utils import make_context

    return [
        torch.tensor([make_context(tokenizer, query, history)[1]], dtype=torch.long)
        for query, history in PROBE_PROMPTS
    ]


def probe_logits(model: Any, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    import torch

    with torch.no_grad():
        return [model(input_ids=ids, use_cache=False).logits.float() for ids in inputs]


def compare_logits(
    reference: list[torch.Tensor], merged: list[torch.Tensor], dtype_name: str
) -> dict[str, float]:
    """Largest logit difference and the tolerance it must stay within for arithmetic in `dtype_name`."""
    max_diff = max(float((a - b).abs().max()) for a, b in zip(reference, merged))
    max_logit = max(float(a.abs().max()) for a in reference)
    tolerance = RELATIVE_TOLERANCE[dtype_name] * max(1.0, max_logit)
    return {"max_abs_logit_diff": max_diff, "max_abs_logit": max_logit, "tolerance": tolerance}


def verify_saved_weights(out_dir: Path, model: torch.nn.Module) -> int:
    """Every tensor in the written safetensors equals the merged model's; returns how many were compared."""
    import torch
    from safetensors import safe_open

    expected = model.state_dict()
    seen = set()
    for weights_file in sorted(out_dir.glob("*.safetensors")):
        with safe_open(str(weights_file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                if key not in expected:
                    raise MergeCheckError(
                        f"{weights_file.name} holds {key}, which the merged model does not have"
                    )
                if not torch.equal(handle.get_tensor(key), expected[key].detach().cpu()):
                    raise MergeCheckError(
                        f"{weights_file.name}: {key} differs from the merged model's weights"
                    )
                seen.add(key)
    missing = sorted(set(expected) - seen)
    if missing:
        raise MergeCheckError(f"the written checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    return len(seen)


# ---------------------------------------------------------------------------------------- the merge


def merge_adapter(options: MergeArguments) -> dict[str, Any]:
    """Merge the LoRA adapter `options.adapter_dir` into its base and write a standalone checkpoint
    to `options.output_dir`.

    Returns a report: paths, dtypes, notes, and the self-check (largest logit difference and its
    tolerance).
    """
    adapter, adapter_config, weights_file = resolve_adapter(options.adapter_dir)
    base, notes = resolve_base(adapter, adapter_config, options.base_model_path)
    check_output_dir(options.output_dir, options.overwrite, inputs=[adapter, base])

    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    import qwen_model  # noqa: F401  (registers the Qwen classes with the Auto* factories)

    from .model_dir import complete_model_dir, load_tokenizer_of
    from .precision import checkpoint_dtype, dtype_from_name, set_precision_flags

    base_config = AutoConfig.from_pretrained(base)
    check_adapter_fits_base(weights_file, base_config, base)
    compute_dtype = dtype_from_name(options.compute_dtype)
    save_dtype = checkpoint_dtype(base_config) if options.dtype == "auto" else compute_dtype
    for note in notes:
        logger.warning(note)

    tokenizer = load_tokenizer_of([adapter, base])
    logger.info("loading base model %s (%s) and adapter %s", base, options.compute_dtype, adapter)
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=compute_dtype)
    model = PeftModel.from_pretrained(base_model, adapter).eval()

    inputs = probe_inputs(tokenizer)
    reference = probe_logits(model, inputs)
    merged = model.merge_and_unload().eval()
    check = compare_logits(reference, probe_logits(merged, inputs), options.compute_dtype)
    logger.info(
        "self-check: max |merged - (base+adapter)| logit difference %.3g (tolerance %.3g, %d prompts)",
        check["max_abs_logit_diff"],
        check["tolerance"],
        len(inputs),
    )
    if not check["max_abs_logit_diff"] <= check["tolerance"]:
        hint = (
            " Merge in float32 (--dtype auto) for an exact merge."
            if options.compute_dtype != "float32"
            else ""
        )
        raise MergeCheckError(
            f"the merged model's logits differ from base+adapter by {check['max_abs_logit_diff']:.4g} "
            f"(tolerance {check['tolerance']:.3g} for {options.compute_dtype}); nothing was written.{hint}"
        )

    merged = merged.to(save_dtype)
    set_precision_flags(merged.config, save_dtype)
    saved_dtype = str(save_dtype).removeprefix("torch.")
    with staged_output_dir(options.output_dir, options.overwrite, inputs=[adapter, base]) as staging:
        with writing_output(options.output_dir, "the merged model"):
            merged.save_pretrained(staging, max_shard_size=options.max_shard_size)
            complete_model_dir(staging, tokenizer=tokenizer, generation_sources=[adapter, base])
            compared = verify_saved_weights(staging, merged)
        weight_files = sorted(path.name for path in staging.glob("*.safetensors"))
    logger.info(
        "wrote %s (%d tensors in %d files, %s)", options.output_dir, compared, len(weight_files), saved_dtype
    )
    return {
        "adapter_dir": str(adapter),
        "base_model_path": str(base),
        "output_dir": str(Path(options.output_dir).expanduser().resolve()),
        "merge_dtype": options.compute_dtype,
        "saved_dtype": saved_dtype,
        "weight_files": weight_files,
        "num_check_prompts": len(inputs),
        **check,
        "notes": notes,
    }


# ------------------------------------------------------------------------------------------ command


def build_parser() -> HfArgumentParser:
    from transformers import HfArgumentParser
    from transformers.hf_argparser import DataClassType

    return HfArgumentParser(
        DataClassType(MergeArguments),
        description="Merge a LoRA adapter into its base model and write a standalone checkpoint (official Qwen "
        "layout: config with auto_map, tokenizer, generation config, model code, sharded safetensors). "
        "Reference: docs/after_training.md.",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    namespace = parser.parse_args(argv)
    log_to_stderr("merge")
    try:
        report = merge_adapter(MergeArguments(**vars(namespace)))
    except ToolkitError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    print(f"merged {report['adapter_dir']} into {report['base_model_path']}")
    print(
        f"self-check on {report['num_check_prompts']} prompts: max logit difference "
        f"{report['max_abs_logit_diff']:.3g} (tolerance {report['tolerance']:.3g}, merged in {report['merge_dtype']})"
    )
    print(
        f"wrote {report['output_dir']} ({report['saved_dtype']}, {len(report['weight_files'])} weight file(s))"
    )
    return 0

"""export_gguf.py: a Qwen (v1) checkpoint, or a base model with a LoRA adapter, as one GGUF file.

    python export_gguf.py --model_dir DIR [--adapter_dir A] --out FILE.gguf --outtype f32|f16|bf16|q8_0

The file is llama.cpp's `qwen` architecture with the tokenizer, the chat template and the
checkpoint's sampling defaults inside, so `llama-cli -m FILE.gguf` and `llama-server` chat with it
as they are; `FILE.Modelfile` beside it does the same for `ollama create NAME -f FILE.Modelfile`.
Both files are written under temporary names and renamed at the end: a failed or interrupted export
leaves nothing behind, and an existing file is replaced only with --overwrite.

torch, transformers, peft and the gguf package are imported by the functions that use them, so
`--help` and flag errors come back at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qwen_finetune.checkpoint_info import QUANTIZE_REPORT_FILE, Checkpoint, read_checkpoint
from qwen_finetune.console import VERBOSE_HELP, log_to_stderr
from qwen_finetune.errors import ArgumentError, ToolkitError
from qwen_finetune.json_files import read_json
from qwen_finetune.tokenizer_protocol import QwenTokenizerLike

from .packages import require
from .tensors import OUT_TYPES, OutType

if TYPE_CHECKING:
    from transformers import HfArgumentParser

    from .verify import Verification

logger = logging.getLogger(__name__)

GGUF_SUFFIX = ".gguf"
MODELFILE_SUFFIX = ".Modelfile"


@dataclass
class ExportArguments:
    """The flags of export_gguf.py, and the options of `export_gguf`."""

    model_dir: str = field(
        metadata={
            "help": "Full-precision Qwen (v1) checkpoint directory: a training output, a merged model or a "
            "released one (with --adapter_dir: the base model the adapter was trained on)."
        }
    )
    out: str = field(
        metadata={
            "help": "GGUF file to write (NAME.gguf); the Ollama Modelfile goes beside it (NAME.Modelfile)."
        }
    )
    outtype: OutType = field(
        metadata={
            "help": "How weight matrices are stored: f32 (exact), f16 or bf16 (half the size), q8_0 (8-bit "
            "blocks, about a quarter). Norms and biases stay float32."
        }
    )
    adapter_dir: str | None = field(
        default=None,
        metadata={
            "help": "LoRA adapter to merge into --model_dir in memory (nothing is written next to either)."
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing GGUF file or Modelfile."})
    verify: bool = field(
        default=False,
        metadata={
            "help": "Before keeping the file, load it in llama.cpp (needs llama-cpp-python), compare its logits "
            "with the PyTorch model's on a few ChatML prompts and print its answer to one."
        },
    )
    verbose: bool = field(default=False, metadata={"help": VERBOSE_HELP})

    def __post_init__(self) -> None:
        """Literal types are not enforced outside the command line: check what Python callers pass."""
        if self.outtype not in OUT_TYPES:
            raise ArgumentError(f"--outtype {self.outtype} is not one of {', '.join(OUT_TYPES)}")


@dataclass(frozen=True)
class ExportReport:
    gguf_path: Path
    modelfile_path: Path
    outtype: OutType
    tensors: int
    file_bytes: int
    seconds: float
    verification: Verification | None


def output_paths(out: str, overwrite: bool) -> tuple[Path, Path]:
    """The GGUF file and its Modelfile, refused when they exist (without --overwrite) or cannot be made."""
    gguf_path = Path(out).expanduser().resolve()
    if gguf_path.suffix != GGUF_SUFFIX:
        raise ArgumentError(
            f"--out {out}: name the GGUF file with the {GGUF_SUFFIX} suffix, e.g. model-f16.gguf"
        )
    modelfile_path = gguf_path.with_suffix(MODELFILE_SUFFIX)
    for path in (gguf_path, modelfile_path):
        if path.is_dir():
            raise ArgumentError(f"{path} is a directory; --out names the GGUF file to write")
        if path.exists() and not overwrite:
            raise ArgumentError(
                f"{path} already exists; pass --overwrite to replace it, or choose another --out"
            )
    parent = gguf_path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ArgumentError(f"--out {out}: {parent} is not a directory")
    return gguf_path, modelfile_path


def _quantized_checkpoint_error(checkpoint: Checkpoint) -> ArgumentError:
    """GPTQ weights cannot become GGUF weights; say where full-precision ones come from."""
    report = checkpoint.path / QUANTIZE_REPORT_FILE
    source = read_json(report).get("source_model") if report.is_file() else None
    where = (
        f"Export its full-precision source instead ({source}, recorded by run_gptq.py)"
        if source
        else "Export the full-precision model it was made from instead"
    )
    return ArgumentError(
        f"--model_dir {checkpoint.path} is a {checkpoint.quant_method} checkpoint: its quantized weights cannot be "
        f"converted to GGUF. {where}. For a Q-LoRA adapter trained on it, merge the adapter into the "
        "full-precision base: python merge_lora.py --adapter_dir ADAPTER --base_model_path FULL_MODEL "
        "--output_dir MERGED, then export MERGED (or pass --model_dir FULL_MODEL --adapter_dir ADAPTER here)"
    )


def resolve_inputs(model_dir: str, adapter_dir: str | None) -> tuple[Checkpoint, Path | None]:
    """The checkpoint to export and the adapter to merge into it, checked before any heavy work."""
    checkpoint = read_checkpoint(model_dir, flag="--model_dir")
    if checkpoint.quant_method is not None:
        raise _quantized_checkpoint_error(checkpoint)
    if adapter_dir is None:
        return checkpoint, None
    from transformers import AutoConfig

    import qwen_model  # noqa: F401  (registers the Qwen config with AutoConfig)
    from qwen_finetune.merge import check_adapter_fits_base, resolve_adapter

    adapter, _, weights_file = resolve_adapter(adapter_dir)
    check_adapter_fits_base(weights_file, AutoConfig.from_pretrained(str(checkpoint.path)), checkpoint.path)
    return checkpoint, adapter


def stop_texts(tokenizer: QwenTokenizerLike, generation_config: dict[str, Any], chat: bool) -> list[str]:
    """Texts that end an answer: the ChatML stop tokens (chat models) or <|endoftext|>, plus the
    checkpoint's own stop words (generation_config stop_words_ids, multi-token ones included)."""
    from qwen_model.qwen_generation_utils import get_stop_words_ids

    sequences = [
        *get_stop_words_ids("chatml" if chat else "raw", tokenizer),
        *(generation_config.get("stop_words_ids") or []),
    ]
    return list(dict.fromkeys(tokenizer.decode(ids) for ids in sequences))


@contextlib.contextmanager
def staged_file(target: Path) -> Iterator[Path]:
    """A temporary path beside `target` that replaces `target` when the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.name}.partial-", dir=target.parent)
    os.close(handle)
    staging = Path(name)
    try:
        yield staging
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o666 & ~umask)
        os.replace(staging, target)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise


def export_gguf(args: ExportArguments) -> ExportReport:
    """Export `args.model_dir` (merged with `args.adapter_dir`) to `args.out`; see the module docstring."""
    started = time.perf_counter()
    require("gguf", "GGUF export")
    if args.verify:
        require("llama_cpp", "--verify")
    gguf_path, modelfile_path = output_paths(args.out, args.overwrite)
    checkpoint, adapter = resolve_inputs(args.model_dir, args.adapter_dir)

    from transformers import AutoConfig

    from qwen_finetune.model_dir import load_tokenizer_of
    from qwen_model.chat_format import DEFAULT_SYSTEM_PROMPT

    from .chat_template import tokenizer_chat_template
    from .metadata import sampling_defaults
    from .modelfile import render_modelfile
    from .tensors import check_architecture
    from .verify import verify_export
    from .vocab import build_vocabulary, tokenizer_ranks
    from .weights import checkpoint_tensors, load_model, model_tensors
    from .writer import write_gguf

    config = AutoConfig.from_pretrained(str(checkpoint.path))
    check_architecture(config)
    tokenizer = load_tokenizer_of([adapter, checkpoint.path] if adapter is not None else [checkpoint.path])
    chat_template = tokenizer_chat_template(tokenizer, str(tokenizer.name_or_path))
    logger.info("building the BPE vocabulary from %s", tokenizer.vocab_file)
    vocabulary = build_vocabulary(tokenizer_ranks(tokenizer), config.vocab_size)
    generation_config = checkpoint.generation_config
    chat = generation_config.get("chat_format") == "chatml"
    sampling = sampling_defaults(generation_config)

    model = None
    if adapter is not None or not checkpoint.tensor_files:
        logger.info("loading %s%s", checkpoint.path, f" and merging the adapter {adapter}" if adapter else "")
        model = load_model(checkpoint.path, adapter)
    with contextlib.ExitStack() as stack:
        if model is not None:
            tensors = model_tensors(model)
        else:
            tensors = stack.enter_context(checkpoint_tensors(checkpoint))
        gguf_staging = stack.enter_context(staged_file(gguf_path))
        modelfile_staging = stack.enter_context(staged_file(modelfile_path))
        logger.info("writing %s (%s, %d tensors)", gguf_path, args.outtype, len(tensors))
        write_gguf(
            gguf_staging,
            config=config,
            name=(adapter or checkpoint.path).name,
            outtype=args.outtype,
            vocabulary=vocabulary,
            chat_template=chat_template,
            sampling=sampling,
            tensors=tensors,
        )
        modelfile = render_modelfile(
            gguf_path,
            chat=chat,
            system_prompt=DEFAULT_SYSTEM_PROMPT,
            stop_texts=stop_texts(tokenizer, generation_config, chat),
            sampling=sampling,
            context_length=config.seq_length,
        )
        modelfile_staging.write_text(modelfile, encoding="utf-8")
        verification = None
        if args.verify:
            logger.info("checking the file in llama.cpp against the PyTorch model")
            reference = model if model is not None else load_model(checkpoint.path, None)
            verification = verify_export(gguf_staging, reference, tokenizer, args.outtype)
    return ExportReport(
        gguf_path=gguf_path,
        modelfile_path=modelfile_path,
        outtype=args.outtype,
        tensors=len(tensors),
        file_bytes=gguf_path.stat().st_size,
        seconds=time.perf_counter() - started,
        verification=verification,
    )


def build_parser() -> HfArgumentParser:
    from transformers import HfArgumentParser
    from transformers.hf_argparser import DataClassType

    return HfArgumentParser(
        DataClassType(ExportArguments),
        description="Export a Qwen (v1) checkpoint (or base model + LoRA adapter) to GGUF for llama.cpp, with an "
        "Ollama Modelfile beside it. Reference: docs/using_elsewhere.md.",
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    namespace = parser.parse_args(argv)
    log_to_stderr("gguf")
    try:
        report = export_gguf(ExportArguments(**vars(namespace)))
    except ToolkitError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    print(
        f"wrote {report.gguf_path} ({report.outtype}, {report.tensors} tensors, {report.file_bytes / 1e6:.1f} MB, "
        f"{report.seconds:.1f} s) and {report.modelfile_path.name} beside it"
    )
    if report.verification is not None:
        check = report.verification
        print(
            f"llama.cpp check on {check.positions} positions: max logit difference {check.max_abs_logit_diff:.3g} "
            f"(largest logit {check.max_abs_logit:.3g}), same top-1 token at {check.top1_agreement:.1%}"
        )
        print(f"llama.cpp answers {check.answer_prompt!r}: {check.answer!r}")
    print(f"chat with it: llama-cli -m {report.gguf_path}, or ollama create NAME -f {report.modelfile_path}")
    return 0

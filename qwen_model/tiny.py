"""Deterministic random-init Qwen checkpoints in the official layout, for tests and benchmarks.

    python -m qwen_model.tiny --out DIR --size tiny|small|qwen-1.8b|qwen-7b|qwen-14b|qwen-72b [--base]
                              [--seed 0]

A checkpoint has config.json (with auto_map), generation_config.json, sharded safetensors weights
(`model-0000N-of-0000M.safetensors` + `model.safetensors.index.json`, as the released models),
qwen.tiktoken, tokenizer_config.json and the portable model code, so it loads like a released one.

Chat or base: the toolkit reads `chat_format` in generation_config.json, as the released
checkpoints set it: "chatml" means a chat model (knows the ChatML turn tokens); anything else
("raw", as written with --base) or no value means a base model.

Sizes (the full vocabulary is kept so that real token ids work):
    tiny       hidden 64, 2 layers, 4 heads x 16, fp32 ("fp32": true): ~19.5M parameters, all but
               ~0.1M of them in the two embedding matrices; exact and fast for tests.
    small      hidden 320, 6 layers, 5 heads x 64, bf16 ("bf16": true): ~105M parameters, for benchmarks.
    qwen-1.8b, qwen-7b, qwen-14b, qwen-72b
               the released architectures (config fields as in the official config.json files), random
               weights in bf16 as the official checkpoints store them: 1.84B, 7.72B, 14.2B and 72.3B
               parameters, i.e. about 3.7, 15.4, 28.3 and 145 GB on disk. They are written one shard
               at a time (each tensor drawn from its own seeded generator), so writing one needs about
               two shards of memory (2 GB shards), never the whole model.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig

from .configuration_qwen import QWenConfig
from .modeling_qwen import RESIDUAL_PROJECTION_MARK, QWenLMHeadModel
from .portable import write_portable_code
from .tokenization_qwen import ENDOFTEXT_ID, IM_END_ID, IM_START_ID, QWenTokenizer

PACKAGE_DIR = Path(__file__).resolve().parent
VOCAB_FILE = PACKAGE_DIR / "qwen.tiktoken"
WEIGHTS_INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class ModelSize:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_channels: int
    intermediate_size: int  # the MLP width is half of it, as in the released configs
    vocab_size: int
    seq_length: int
    max_position_embeddings: int
    rotary_emb_base: float
    dtype: torch.dtype
    max_shard_size: str
    streamed: bool  # written shard by shard from per-tensor generators (the released shapes)


SIZES = {
    "tiny": ModelSize(64, 2, 4, 16, 256, 151936, 2048, 2048, 10000, torch.float32, "50MB", False),
    "small": ModelSize(320, 6, 5, 64, 1728, 151936, 2048, 2048, 10000, torch.bfloat16, "100MB", False),
    "qwen-1.8b": ModelSize(2048, 24, 16, 128, 11008, 151936, 8192, 8192, 10000, torch.bfloat16, "2GB", True),
    "qwen-7b": ModelSize(4096, 32, 32, 128, 22016, 151936, 8192, 8192, 10000, torch.bfloat16, "2GB", True),
    "qwen-14b": ModelSize(5120, 40, 40, 128, 27392, 152064, 2048, 8192, 10000, torch.bfloat16, "2GB", True),
    "qwen-72b": ModelSize(
        8192, 80, 64, 128, 49152, 152064, 32768, 32768, 1000000, torch.bfloat16, "2GB", True
    ),
}
PRECISION_FLAGS = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def default_vocab_file() -> Path:
    """qwen.tiktoken inside the qwen_model package, where scripts/setup.sh puts it."""
    if not VOCAB_FILE.is_file():
        raise FileNotFoundError(
            f"the Qwen vocabulary is missing: {VOCAB_FILE} not found. Run `bash scripts/setup.sh` (it copies "
            "or downloads it and checks its sha256), or copy qwen.tiktoken from any released Qwen (v1) "
            "checkpoint there"
        )
    return VOCAB_FILE


def tiny_config(size: str = "tiny") -> QWenConfig:
    """The QWenConfig of a named size (all other fields at the released checkpoints' defaults)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: choose one of {sorted(SIZES)}")
    shape = SIZES[size]
    precision = PRECISION_FLAGS[shape.dtype]
    return QWenConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        kv_channels=shape.kv_channels,
        intermediate_size=shape.intermediate_size,
        seq_length=shape.seq_length,
        max_position_embeddings=shape.max_position_embeddings,
        rotary_emb_base=shape.rotary_emb_base,
        architectures=["QWenLMHeadModel"],
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        fp32=precision == "fp32",
    )


def tiny_generation_config(base: bool, max_window_size: int = 2048) -> GenerationConfig:
    """generation_config.json as the released chat / base checkpoints write it."""
    common = {
        "eos_token_id": ENDOFTEXT_ID,
        "pad_token_id": ENDOFTEXT_ID,
        "max_new_tokens": 512,
        "do_sample": True,
        "top_k": 0,
        "top_p": 0.8,
        "repetition_penalty": 1.1,
    }
    if base:
        return GenerationConfig(chat_format="raw", stop_words_ids=[[ENDOFTEXT_ID]], **common)
    return GenerationConfig(
        chat_format="chatml",
        max_window_size=max_window_size,
        stop_words_ids=[[IM_END_ID], [IM_START_ID], [ENDOFTEXT_ID]],
        **common,
    )


def build_tiny_checkpoint(
    out_dir: str | os.PathLike, size: str = "tiny", base: bool = False, seed: int = 0
) -> Path:
    """Write a random-init checkpoint (same seed and size, same weights) and return its directory.

    Everything is written into a staging directory beside `out_dir` first and moved into place at
    the end, so an interrupted run leaves no half-written checkpoint.
    """
    config = tiny_config(size)
    shape = SIZES[size]
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        generation = tiny_generation_config(base, max_window_size=min(shape.seq_length, 8192))
        if shape.streamed:
            write_random_weights(config, staging, seed, shape.dtype, _shard_bytes(shape.max_shard_size))
            config.save_pretrained(staging)
            generation.save_pretrained(staging)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = QWenLMHeadModel(config)
            torch.nn.Module.to(model, shape.dtype)  # the weights as stored: fp32 or bf16
            model.generation_config = generation
            model.save_pretrained(staging, max_shard_size=shape.max_shard_size)
        QWenTokenizer(default_vocab_file(), model_max_length=shape.seq_length).save_pretrained(staging)
        write_portable_code(staging)
        out.mkdir(exist_ok=True)
        for path in staging.iterdir():
            os.replace(path, out / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _shard_bytes(size: str) -> int:
    units = {"GB": 10**9, "MB": 10**6}
    return int(float(size[:-2]) * units[size[-2:]])


def _parameter_shapes(config: QWenConfig) -> list[tuple[str, torch.Size, float | None]]:
    """(name, shape, init std) of every tensor, in state-dict order; std None: a norm weight (ones),
    0.0: a bias (zeros). The stds are those of QWenPreTrainedModel._init_weights."""
    with torch.device("meta"):
        model = QWenLMHeadModel(config)
    residual_std = config.initializer_range / (2 * config.num_hidden_layers) ** 0.5
    residual = {
        f"{name}.weight"
        for name, module in model.named_modules()
        if getattr(module, RESIDUAL_PROJECTION_MARK, False)
    }
    shapes: list[tuple[str, torch.Size, float | None]] = []
    for name, tensor in model.state_dict().items():
        if name.endswith(".bias"):
            std: float | None = 0.0
        elif tensor.dim() == 1:
            std = None
        else:
            std = residual_std if name in residual else config.initializer_range
        shapes.append((name, tensor.shape, std))
    return shapes


def _random_tensor(
    name: str, shape: torch.Size, std: float | None, seed: int, dtype: torch.dtype
) -> torch.Tensor:
    if std is None:
        return torch.ones(shape, dtype=dtype)
    if std == 0.0:
        return torch.zeros(shape, dtype=dtype)
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))  # 32-bit seeds
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=generator)


def _shards(
    shapes: list[tuple[str, torch.Size, float | None]], element_bytes: int, max_bytes: int
) -> Iterator[list[tuple[str, torch.Size, float | None]]]:
    """Consecutive groups of tensors of at most `max_bytes` each (a larger tensor gets its own)."""
    group: list[tuple[str, torch.Size, float | None]] = []
    size = 0
    for entry in shapes:
        tensor_bytes = entry[1].numel() * element_bytes
        if group and size + tensor_bytes > max_bytes:
            yield group
            group, size = [], 0
        group.append(entry)
        size += tensor_bytes
    if group:
        yield group


def write_random_weights(
    config: QWenConfig, directory: Path, seed: int, dtype: torch.dtype, max_shard_bytes: int
) -> None:
    """Sharded safetensors and their index, one shard in memory at a time."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    shapes = _parameter_shapes(config)
    element_bytes = torch.empty((), dtype=dtype).element_size()
    groups = list(_shards(shapes, element_bytes, max_shard_bytes))
    weight_map: dict[str, str] = {}
    for number, group in enumerate(groups, start=1):
        file_name = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: _random_tensor(name, shape, std, seed, dtype) for name, shape, std in group}
        save_file(tensors, directory / file_name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file_name))
        del tensors
    total_parameters = sum(shape.numel() for _, shape, _ in shapes)
    index = {
        "metadata": {"total_parameters": total_parameters, "total_size": total_parameters * element_bytes},
        "weight_map": weight_map,
    }
    (directory / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a deterministic random-init Qwen checkpoint.")
    parser.add_argument("--out", required=True, help="directory to write (created if missing)")
    parser.add_argument("--size", choices=list(SIZES), default="tiny")
    parser.add_argument("--base", action="store_true", help='base model: generation_config chat_format "raw"')
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # DeepSpeed, when installed, logs its accelerator guess the first time transformers asks about it.
    logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)
    out = build_tiny_checkpoint(args.out, size=args.size, base=args.base, seed=args.seed)
    config = tiny_config(args.size)
    kind = "base" if args.base else "chat"
    index = json.loads((out / WEIGHTS_INDEX).read_text())
    print(f"wrote a random-init {args.size} {kind} Qwen checkpoint to {out}")
    print(
        f"  {index['metadata']['total_parameters'] / 1e6:.1f}M parameters: hidden {config.hidden_size}, "
        f"{config.num_hidden_layers} layers, {config.num_attention_heads} heads x {config.kv_channels}, "
        f"vocab rows {config.vocab_size}, dtype {SIZES[args.size].dtype}, seed {args.seed}"
    )
    for path in sorted(out.iterdir()):
        print(f"  {path.name:40s} {path.stat().st_size / 1e6:10.2f} MB")


if __name__ == "__main__":
    main()

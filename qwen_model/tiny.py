"""Deterministic random-init Qwen checkpoints in the official layout, for tests and benchmarks.

    python -m qwen_model.tiny --out DIR --size tiny|small [--base] [--seed 0]

A checkpoint has config.json (with auto_map), generation_config.json, sharded safetensors weights
(`model-0000N-of-0000M.safetensors` + `model.safetensors.index.json`, as the released models),
qwen.tiktoken, tokenizer_config.json and the portable model code, so it loads like a released one.

Chat or base: the toolkit reads `chat_format` in generation_config.json, as the released
checkpoints set it: "chatml" means a chat model (knows the ChatML turn tokens); anything else
("raw", as written with --base) or no value means a base model.

Sizes (the full 151936-row vocabulary is kept so that real token ids work):
    tiny   hidden 64, 2 layers, 4 heads x 16, fp32 ("fp32": true): ~19.5M parameters, all but
           ~0.1M of them in the two embedding matrices; exact and fast for tests.
    small  hidden 320, 6 layers, 5 heads x 64, bf16 ("bf16": true): ~105M parameters, for benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import GenerationConfig

from .configuration_qwen import QWenConfig
from .modeling_qwen import QWenLMHeadModel
from .portable import write_portable_code
from .tokenization_qwen import ENDOFTEXT_ID, IM_END_ID, IM_START_ID, QWenTokenizer

PACKAGE_DIR = Path(__file__).resolve().parent
VOCAB_ROWS = 151936


@dataclass(frozen=True)
class TinySize:
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    kv_channels: int
    intermediate_size: int  # the MLP width is half of it, as in the released configs
    dtype: torch.dtype
    max_shard_size: str


SIZES = {
    "tiny": TinySize(64, 2, 4, 16, 256, torch.float32, "50MB"),
    "small": TinySize(320, 6, 5, 64, 1728, torch.bfloat16, "100MB"),
}
SEQ_LENGTH = 2048


def default_vocab_file() -> Path:
    """qwen.tiktoken from $QWEN_TIKTOKEN, else qwen_model/, else ../shared/ beside the repo."""
    from_env = os.environ.get("QWEN_TIKTOKEN")
    if from_env:
        if not Path(from_env).is_file():
            raise FileNotFoundError(
                f"QWEN_TIKTOKEN={from_env} is not a file; unset it or point it at qwen.tiktoken"
            )
        return Path(from_env)
    candidates = [PACKAGE_DIR / "qwen.tiktoken", PACKAGE_DIR.parent.parent / "shared" / "qwen.tiktoken"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the Qwen vocabulary qwen.tiktoken was not found (looked at $QWEN_TIKTOKEN, "
        f"{', '.join(map(str, candidates))}); run `bash scripts/setup.sh` to put it in place"
    )


def tiny_config(size: str = "tiny") -> QWenConfig:
    """The QWenConfig of a named size (all other fields at the released checkpoints' defaults)."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}: choose one of {sorted(SIZES)}")
    shape = SIZES[size]
    return QWenConfig(
        vocab_size=VOCAB_ROWS,
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        kv_channels=shape.kv_channels,
        intermediate_size=shape.intermediate_size,
        seq_length=SEQ_LENGTH,
        max_position_embeddings=SEQ_LENGTH,
        fp32=shape.dtype == torch.float32,
        bf16=shape.dtype == torch.bfloat16,
        architectures=["QWenLMHeadModel"],
    )


def tiny_generation_config(base: bool) -> GenerationConfig:
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
        max_window_size=SEQ_LENGTH,
        stop_words_ids=[[IM_END_ID], [IM_START_ID], [ENDOFTEXT_ID]],
        **common,
    )


def build_tiny_checkpoint(
    out_dir: str | os.PathLike, size: str = "tiny", base: bool = False, seed: int = 0
) -> Path:
    """Write a random-init checkpoint (same seed and size, same weights) and return its directory."""
    config = tiny_config(size)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = QWenLMHeadModel(config)
    model.to(SIZES[size].dtype)
    model.generation_config = tiny_generation_config(base)
    model.save_pretrained(out, max_shard_size=SIZES[size].max_shard_size)
    QWenTokenizer(default_vocab_file(), model_max_length=SEQ_LENGTH).save_pretrained(out)
    write_portable_code(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a deterministic random-init Qwen checkpoint.")
    parser.add_argument("--out", required=True, help="directory to write (created if missing)")
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--base", action="store_true", help='base model: generation_config chat_format "raw"')
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = build_tiny_checkpoint(args.out, size=args.size, base=args.base, seed=args.seed)
    config = tiny_config(args.size)
    kind = "base" if args.base else "chat"
    index = json.loads((out / "model.safetensors.index.json").read_text())
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

"""`--verify`: load the written file in llama.cpp and compare it with the PyTorch model.

The probe prompts are those merge_lora.py checks itself with (ChatML, English, Chinese, history).
float32 files must give the same logits up to float32 rounding; half-precision and q8_0 files round
every weight, so they must agree on the most likely next token at most positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qwen_finetune.errors import ToolkitError
from qwen_finetune.tokenizer_protocol import QwenTokenizerLike

from .packages import require
from .tensors import OutType

# float32: largest |llama.cpp - PyTorch| logit difference, relative to the largest |logit|.
F32_RELATIVE_TOLERANCE = 1e-3
# Rounded weights: the share of positions whose top-1 token must agree.
MIN_TOP1_AGREEMENT = 0.9
ANSWER_TOKENS = 32


class VerificationError(ToolkitError):
    """llama.cpp computes something else from the written file than the PyTorch model does."""


@dataclass(frozen=True)
class Verification:
    max_abs_logit_diff: float
    max_abs_logit: float
    top1_agreement: float
    positions: int
    answer_prompt: str
    answer: str


def open_in_llama_cpp(gguf_path: Path, n_ctx: int) -> Any:
    """The file in llama.cpp, keeping every position's logits. The KV cache is float32 (llama.cpp's
    default is float16), so what is compared is the file, not the cache's rounding."""
    llama_cpp = require("llama_cpp", "--verify")
    return llama_cpp.Llama(
        model_path=str(gguf_path),
        n_ctx=n_ctx,
        logits_all=True,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        verbose=False,
    )


def _compare(llm: Any, model: torch.nn.Module, tokenizer: QwenTokenizerLike) -> Verification:
    from qwen_finetune.merge import PROBE_PROMPTS, probe_inputs

    max_diff = max_logit = 0.0
    agreeing = positions = 0
    with torch.no_grad():
        for ids in probe_inputs(tokenizer):
            reference = model(input_ids=ids, use_cache=False).logits[0].float()
            llm.reset()
            llm.eval(ids[0].tolist())
            exported = torch.from_numpy(llm.scores[: ids.shape[1]].copy())
            max_diff = max(max_diff, float((exported - reference).abs().max()))
            max_logit = max(max_logit, float(reference.abs().max()))
            agreeing += int((exported.argmax(-1) == reference.argmax(-1)).sum())
            positions += ids.shape[1]
    question = PROBE_PROMPTS[0][0]
    completion = llm.create_chat_completion(
        messages=[{"role": "user", "content": question}], max_tokens=ANSWER_TOKENS, temperature=0.0
    )
    return Verification(
        max_abs_logit_diff=max_diff,
        max_abs_logit=max_logit,
        top1_agreement=agreeing / positions,
        positions=positions,
        answer_prompt=question,
        answer=completion["choices"][0]["message"]["content"],
    )


def verify_export(
    gguf_path: Path, model: torch.nn.Module, tokenizer: QwenTokenizerLike, outtype: OutType
) -> Verification:
    """Compare llama.cpp's logits on the probe prompts with the model's; raise when they disagree."""
    from qwen_finetune.merge import probe_inputs

    longest = max(ids.shape[1] for ids in probe_inputs(tokenizer))
    llm = open_in_llama_cpp(gguf_path, n_ctx=longest + ANSWER_TOKENS)
    try:
        result = _compare(llm, model, tokenizer)
    finally:
        llm.close()
    if outtype == "f32" and not result.max_abs_logit_diff <= F32_RELATIVE_TOLERANCE * max(
        1.0, result.max_abs_logit
    ):
        raise VerificationError(
            f"llama.cpp's logits differ from the PyTorch model's by up to {result.max_abs_logit_diff:.3g} (largest "
            f"logit {result.max_abs_logit:.3g}); nothing was written"
        )
    if outtype != "f32" and result.top1_agreement < MIN_TOP1_AGREEMENT:
        raise VerificationError(
            f"llama.cpp agrees with the PyTorch model on the next token at only {result.top1_agreement:.0%} of "
            f"{result.positions} positions ({outtype} weights); nothing was written. Export f32 or f16 instead"
        )
    return result

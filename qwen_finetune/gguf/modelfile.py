"""The Ollama Modelfile written beside a GGUF export: `ollama create NAME -f FILE`.

Ollama renders prompts with Go templates, not Jinja, so the ChatML turn format is spelled out
here. Ollama puts the SYSTEM line's prompt first in `.Messages` when a conversation brings no
system message, so the template renders exactly the prompt `chat()` builds. Tool calls are not
rendered (the toolkit's ReAct format lives in the Jinja template, which Ollama does not read).
Base models (chat_format "raw") keep Ollama's default template, the prompt as it is.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .metadata import SamplingDefaults

# One ChatML turn per message, then the opened assistant turn.
CHATML_TEMPLATE = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"


def render_modelfile(
    gguf_file: Path,
    *,
    chat: bool,
    system_prompt: str,
    stop_texts: Sequence[str],
    sampling: SamplingDefaults,
    context_length: int,
) -> str:
    """The Modelfile text; `gguf_file` is named relative to the Modelfile, which lies beside it."""
    lines = [f"FROM ./{gguf_file.name}"]
    if chat:
        lines.append(f'TEMPLATE """{CHATML_TEMPLATE}"""')
        lines.append(f'SYSTEM """{system_prompt}"""')
    lines += [f"PARAMETER stop {json.dumps(text, ensure_ascii=False)}" for text in stop_texts]
    lines += [
        f"PARAMETER temperature {sampling.temperature:g}",
        f"PARAMETER top_k {sampling.top_k}",
        f"PARAMETER top_p {sampling.top_p:g}",
        f"PARAMETER repeat_penalty {sampling.repeat_penalty:g}",
        f"PARAMETER repeat_last_n {sampling.penalty_last_n}",
        f"PARAMETER num_ctx {context_length}",
    ]
    return "\n".join(lines) + "\n"

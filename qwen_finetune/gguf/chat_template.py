"""The tokenizer's chat template in the form every GGUF reader renders the same way.

The checkpoint's template marks supervised assistant text with `{% generation %}` ...
`{% endgeneration %}`, a transformers extension for training masks that renders its body as is.
Engines that read the template from a GGUF file do not all know the tag (older llama-cpp-python
releases refuse to load such a file), so the export writes each marker as the plain Jinja block
`{% if true %}` ... `{% endif %}`: same body, same whitespace control, same text rendered.
"""

from __future__ import annotations

import re

from qwen_finetune.errors import InputFileError
from qwen_finetune.tokenizer_protocol import QwenTokenizerLike

_GENERATION_OPEN = re.compile(r"\{%(-?)\s*generation\s*(-?)%\}")
_GENERATION_CLOSE = re.compile(r"\{%(-?)\s*endgeneration\s*(-?)%\}")


def portable_chat_template(template: str) -> str:
    """`template` with the generation markers written as plain Jinja blocks."""
    opened = _GENERATION_OPEN.sub(r"{%\1 if true \2%}", template)
    return _GENERATION_CLOSE.sub(r"{%\1 endif \2%}", opened)


def tokenizer_chat_template(tokenizer: QwenTokenizerLike, source: str) -> str:
    """The tokenizer's default chat template, ready for the GGUF file; `source` names where it came from."""
    template = tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not isinstance(template, str) or not template:
        raise InputFileError(
            f"the tokenizer of {source} has no chat template, so llama.cpp and Ollama would not know the "
            "ChatML turn format. Loaded through qwen_model, a tokenizer without one gets the toolkit's: "
            "remove the empty chat_template (chat_template.jinja or the tokenizer_config.json entry)"
        )
    return portable_chat_template(template)

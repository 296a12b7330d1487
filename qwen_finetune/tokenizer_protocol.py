"""What the toolkit needs of a tokenizer, as a type.

The toolkit works with the bundled QWenTokenizer, but also with the copy of it that a checkpoint
carries and `trust_remote_code=True` loads (a different class object with the same interface), so
the code states the interface it uses rather than one class.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from qwen_model.tokenization_qwen import Vocabulary


class QwenTokenizerLike(Protocol):
    @property
    def eod_id(self) -> int: ...

    @property
    def im_start_id(self) -> int: ...

    @property
    def im_end_id(self) -> int: ...

    @property
    def pad_token_id(self) -> int | None: ...

    padding_side: str
    chat_template: str | None
    name_or_path: str
    vocab_file: str  # qwen.tiktoken, for exporters that rebuild the vocabulary
    vocabulary: Vocabulary

    def encode_text(self, text: str, allow_special: bool = False) -> list[int]: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ..., **kwargs: Any) -> str: ...

    def save_pretrained(self, save_directory: Any, **kwargs: Any) -> tuple[str, ...]: ...

    def __len__(self) -> int: ...

"""The Qwen vocabulary as llama.cpp's byte-level BPE tokenizer reads it.

tiktoken only stores each token's rank; llama.cpp wants the token strings and the merge rules. A
token's merge is found by replaying BPE on its own bytes with the lower-ranked tokens only: the last
two pieces left are the pair that tiktoken joins into it, and the token's rank is the merge's
priority. Tokens are written in the printable byte-level form (`tokenization_qwen.CHAR_OF_BYTE`,
the same byte-to-character table llama.cpp decodes).
"""

from __future__ import annotations

from dataclasses import dataclass

from qwen_finetune.errors import ToolkitError
from qwen_finetune.tokenizer_protocol import QwenTokenizerLike
from qwen_model.tokenization_qwen import LATIN1_TO_PRINTABLE, SPECIAL_IDS, parse_tiktoken_ranks

# llama.cpp's tokenizer family for GPT-2-style byte-level BPE.
TOKENIZER_MODEL = "gpt2"
# llama.cpp's name for the pre-tokenizer split pattern Qwen (v1) shares with Qwen2
# (`tokenization_qwen.PRETOKENIZE_PATTERN`: contractions, letters, single digits, punctuation, spaces).
PRE_TOKENIZER = "qwen2"


class VocabularyError(ToolkitError):
    """The tokenizer's vocabulary cannot be written as BPE merges."""


@dataclass(frozen=True)
class GGUFVocabulary:
    """Token strings and types for every embedding row, and the merges in priority order."""

    tokens: list[str]
    token_types: list[int]
    merges: list[str]


def printable(token: bytes) -> str:
    return token.decode("latin-1").translate(LATIN1_TO_PRINTABLE)


def last_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The two tokens BPE joins last to form `token` (of two or more bytes).

    BPE is replayed on the token's bytes with every token ranked below it, lowest rank first; a
    vocabulary made by BPE training always leaves exactly two pieces.
    """
    limit = ranks[token]
    pieces = [token[index : index + 1] for index in range(len(token))]
    while True:
        best_rank, best_index = limit, -1
        for index in range(len(pieces) - 1):
            rank = ranks.get(pieces[index] + pieces[index + 1])
            if rank is not None and rank < best_rank:
                best_rank, best_index = rank, index
        if best_index < 0:
            break
        pieces[best_index : best_index + 2] = [pieces[best_index] + pieces[best_index + 1]]
    if len(pieces) != 2:
        raise VocabularyError(
            f"token {token!r} (id {limit}) cannot be built from two lower-ranked tokens (BPE leaves "
            f"{len(pieces)} pieces): the vocabulary is not a BPE vocabulary, so llama.cpp cannot use it"
        )
    return pieces[0], pieces[1]


def tokenizer_ranks(tokenizer: QwenTokenizerLike) -> dict[bytes, int]:
    """BPE token -> id of a QWenTokenizer: qwen.tiktoken plus its extra vocabulary, if any."""
    vocabulary = tokenizer.vocabulary
    return {**parse_tiktoken_ranks(vocabulary.base_data, tokenizer.vocab_file), **vocabulary.extra_ranks}


def build_vocabulary(ranks: dict[bytes, int], rows: int) -> GGUFVocabulary:
    """One token per embedding row: BPE tokens, then the special tokens, then padding rows.

    Special tokens are control tokens: llama.cpp turns their text into their id only when asked to
    parse special tokens, as `QWenTokenizer` does (`allow_special`). Rows no text maps to get
    placeholder names and the unused type.
    """
    import gguf

    by_id: dict[int, tuple[str, int]] = {
        rank: (printable(token), gguf.TokenType.NORMAL) for token, rank in ranks.items()
    }
    by_id.update({token_id: (text, gguf.TokenType.CONTROL) for text, token_id in SPECIAL_IDS.items()})
    if max(by_id) >= rows:
        raise VocabularyError(
            f"the tokenizer has ids up to {max(by_id)}, but the model has only {rows} embedding rows: "
            "the tokenizer does not belong to this model"
        )
    entries = [by_id.get(token_id, (f"[PAD{token_id}]", gguf.TokenType.UNUSED)) for token_id in range(rows)]
    merges = [
        " ".join(printable(piece) for piece in last_merge(token, ranks))
        for token, _ in sorted(ranks.items(), key=lambda item: item[1])
        if len(token) > 1
    ]
    return GGUFVocabulary(
        tokens=[text for text, _ in entries],
        token_types=[int(kind) for _, kind in entries],
        merges=merges,
    )

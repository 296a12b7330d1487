"""The Qwen (v1) tokenizer: tiktoken BPE over `qwen.tiktoken`, as a transformers python tokenizer.

A flat module that imports only tiktoken and transformers, because it is copied next to every
checkpoint we write and loaded there with `trust_remote_code=True`.

Tokens (as returned by `tokenize` / `convert_ids_to_tokens`) are strings in the usual byte-level
form: every byte of a BPE token is shown as one printable character, so the vocabulary is a plain
`dict[str, int]`. Special tokens keep their own text (`<|im_start|>`).
"""

from __future__ import annotations

import base64
import binascii
import os
import unicodedata
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any

import tiktoken
from transformers import AddedToken, PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "qwen.tiktoken", "extra_vocab_file": "qwen_extra.tiktoken"}

# Splits text into pieces before BPE; digits are split one by one.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
FIRST_SPECIAL_ID = 151643
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, *(f"<|extra_{i}|>" for i in range(205)))
SPECIAL_IDS = {token: FIRST_SPECIAL_ID + offset for offset, token in enumerate(SPECIAL_TOKENS)}
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = (SPECIAL_IDS[token] for token in (ENDOFTEXT, IM_START, IM_END))
SPECIAL_ID_RANGE = range(FIRST_SPECIAL_ID, FIRST_SPECIAL_ID + len(SPECIAL_TOKENS))


def parse_tiktoken_ranks(data: bytes, source: str) -> dict[bytes, int]:
    """Parse `base64-token rank` lines; malformed lines and duplicate tokens or ranks are errors."""
    ranks: dict[bytes, int] = {}
    line_of_rank: dict[int, int] = {}
    for line_number, line in enumerate(data.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != 2:
                raise ValueError("expected 'base64-token rank'")
            token, rank = base64.b64decode(fields[0], validate=True), int(fields[1])
            if rank < 0:
                raise ValueError("negative rank")
        except (binascii.Error, ValueError) as error:
            raise ValueError(
                f"{source}, line {line_number}: cannot parse {line.strip()!r} ({error})"
            ) from None
        if token in ranks:
            raise ValueError(
                f"{source}, line {line_number}: token {token!r} already listed (rank {ranks[token]})"
            )
        if rank in line_of_rank:
            raise ValueError(
                f"{source}, line {line_number}: rank {rank} already used on line {line_of_rank[rank]}"
            )
        ranks[token] = rank
        line_of_rank[rank] = line_number
    return ranks


def check_base_vocabulary(ranks: dict[bytes, int], source: str) -> None:
    """The base vocabulary must leave the special ids free and not contain special-token text."""
    outside = [rank for rank in ranks.values() if rank >= FIRST_SPECIAL_ID]
    if outside:
        raise ValueError(
            f"{source} is not a Qwen vocabulary: rank {outside[0]} is at or past the first special id "
            f"{FIRST_SPECIAL_ID}. Use the official qwen.tiktoken (bash scripts/setup.sh)."
        )
    clashing = [special for special in SPECIAL_TOKENS if special.encode() in ranks]
    if clashing:
        raise ValueError(f"{source} contains the special token text {clashing[0]!r} as a BPE token")


def check_extra_vocabulary(base_ranks: dict[bytes, int], extra_ranks: dict[bytes, int], source: str) -> None:
    """Extra tokens must be new and use ids nobody uses; any clash is an error naming the token."""
    for token, rank in extra_ranks.items():
        where = f"extra_vocab_file {source}: token {token!r} (id {rank})"
        if token in base_ranks:
            raise ValueError(f"{where} is already in the vocabulary with id {base_ranks[token]}; remove it")
        if token.decode("utf-8", errors="replace") in SPECIAL_IDS:
            raise ValueError(f"{where} is the text of a special token; remove it")
        if rank <= SPECIAL_ID_RANGE[-1]:
            raise ValueError(
                f"{where} collides with an existing id (0..{SPECIAL_ID_RANGE[-1]} are taken); "
                f"give extra tokens ids from {SPECIAL_ID_RANGE[-1] + 1} on"
            )


def _bytes_to_printable_chars() -> list[str]:
    """One printable character per byte value: printable Latin-1 bytes stand for themselves,
    the others (controls, space, ...) are shifted past 255. A bijection, so tokens round-trip."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars: list[str] = []
    shifted = 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


CHAR_OF_BYTE = _bytes_to_printable_chars()
BYTE_OF_CHAR = {char: byte for byte, char in enumerate(CHAR_OF_BYTE)}
# Applied to a token's bytes read as latin-1 (one character per byte), gives its printable form.
LATIN1_TO_PRINTABLE = str.maketrans({chr(byte): char for byte, char in enumerate(CHAR_OF_BYTE)})


class Vocabulary:
    """The vocabulary in every form the tokenizer needs, built from the .tiktoken file contents.

    It pickles as those contents only and is rebuilt on load: pickles stay small, and `datasets`
    (which hashes the tokenizer to key its map() cache) hashes two byte strings, not big dicts.
    """

    def __init__(
        self, base_data: bytes, extra_data: bytes = b"", base_source: str = "", extra_source: str = ""
    ) -> None:
        self.base_data, self.extra_data = base_data, extra_data
        base_ranks = parse_tiktoken_ranks(base_data, base_source)
        check_base_vocabulary(base_ranks, base_source)
        self.extra_ranks = parse_tiktoken_ranks(extra_data, extra_source)
        check_extra_vocabulary(base_ranks, self.extra_ranks, extra_source)
        ranks = {**base_ranks, **self.extra_ranks}
        self.encoding = tiktoken.Encoding(
            "qwen", pat_str=PRETOKENIZE_PATTERN, mergeable_ranks=ranks, special_tokens=SPECIAL_IDS
        )
        self.token_of_id = {
            rank: token.decode("latin-1").translate(LATIN1_TO_PRINTABLE) for token, rank in ranks.items()
        }
        self.id_of_token = {token: token_id for token_id, token in self.token_of_id.items()}
        self.decodable_ids = frozenset(ranks.values()) | frozenset(SPECIAL_ID_RANGE)
        self.id_limit = max(max(ranks.values()), SPECIAL_ID_RANGE[-1]) + 1

    def __reduce__(self) -> tuple[type[Vocabulary], tuple[bytes, bytes]]:
        return Vocabulary, (self.base_data, self.extra_data)


class QWenTokenizer(PreTrainedTokenizer):
    """Qwen tokenizer: `tok(text)` / `tok.encode` turn special-token text into special ids (like the
    original); `encode_text(text)` is the fast path that encodes such text as plain text by default."""

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | os.PathLike,
        errors: str = "replace",
        extra_vocab_file: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_file = str(vocab_file)
        self.extra_vocab_file = None if extra_vocab_file is None else str(extra_vocab_file)
        self.errors = errors
        self.vocabulary = Vocabulary(
            Path(vocab_file).read_bytes(),
            b"" if extra_vocab_file is None else Path(extra_vocab_file).read_bytes(),
            base_source=self.vocab_file,
            extra_source=str(self.extra_vocab_file),
        )
        # The special tokens are the tokenizer's own vocabulary, not tokens added on top of it;
        # registering them lets transformers treat them as special (masks, chat sanitising).
        self._check_saved_added_tokens(kwargs.pop("added_tokens_decoder", {}))
        self._added_tokens_decoder = {
            token_id: AddedToken(token, lstrip=False, rstrip=False, normalized=False, special=True)
            for token, token_id in SPECIAL_IDS.items()
        }
        kwargs.setdefault("pad_token", ENDOFTEXT)
        kwargs.setdefault("eos_token", ENDOFTEXT)
        kwargs.setdefault("extra_special_tokens", [IM_START, IM_END])
        super().__init__(errors=errors, **kwargs)

    @staticmethod
    def _check_saved_added_tokens(saved: dict[int, AddedToken | str]) -> None:
        """A saved `added_tokens_decoder` must match the special tokens: tiktoken cannot take others."""
        for token_id, token in saved.items():
            expected = SPECIAL_TOKENS[token_id - FIRST_SPECIAL_ID] if token_id in SPECIAL_ID_RANGE else None
            if str(token) != expected:
                raise ValueError(
                    f"tokenizer_config.json lists added token {str(token)!r} at id {token_id}, which is not a "
                    "Qwen special token there. QWenTokenizer cannot add tokens: remove the entry and put new "
                    "tokens in an extra_vocab_file (tiktoken lines 'base64-token id')."
                )

    @property
    def eod_id(self) -> int:
        return SPECIAL_IDS[ENDOFTEXT]

    @property
    def im_start_id(self) -> int:
        return SPECIAL_IDS[IM_START]

    @property
    def im_end_id(self) -> int:
        return SPECIAL_IDS[IM_END]

    @property
    def vocab_size(self) -> int:
        """One past the highest id (151851 for the plain vocabulary), the row count embeddings need."""
        return self.vocabulary.id_limit

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def _auto_map(self) -> dict[str, list[str | None]]:
        """Written into tokenizer_config.json by save_pretrained, for loading with trust_remote_code."""
        return {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}

    def __repr__(self) -> str:
        """Short: the default lists all 208 special tokens."""
        return (
            f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"special ids {FIRST_SPECIAL_ID}..{SPECIAL_ID_RANGE[-1]}, pad_token={self.pad_token!r}, "
            f"padding_side={self.padding_side!r}, extra tokens={len(self.vocabulary.extra_ranks)})"
        )

    def get_vocab(self) -> dict[str, int]:
        return {**self.vocabulary.id_of_token, **SPECIAL_IDS}

    def encode_text(self, text: str, allow_special: bool = False) -> list[int]:
        """NFC-normalise and encode. With allow_special=False, special-token text is plain text
        (never a control id); with True it becomes the special id, as the original tokenizer did."""
        text = unicodedata.normalize("NFC", text)
        if allow_special:
            return self.vocabulary.encoding.encode(text, allowed_special="all", disallowed_special=())
        return self.vocabulary.encoding.encode_ordinary(text)

    def tokenize(
        self,
        text: str,
        allowed_special: str | Collection[str] = "all",
        disallowed_special: str | Collection[str] = (),
        split_special_tokens: bool | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Tokens of the NFC-normalised text, with tiktoken's special-token rules: special text in
        `allowed_special` ("all" or a set of token texts) becomes the special token; other special
        text is plain text, unless it is in `disallowed_special`, which raises. `split_special_tokens`
        (the transformers flag) encodes all special text as plain text."""
        if split_special_tokens is None:
            split_special_tokens = self.split_special_tokens
        if split_special_tokens:
            allowed_special, disallowed_special = set(), ()
        for name, chosen in (
            ("allowed_special", allowed_special),
            ("disallowed_special", disallowed_special),
        ):
            if chosen != "all":
                unknown = sorted(set(chosen) - SPECIAL_IDS.keys())
                if unknown:
                    raise ValueError(f"{name} names tokens that are not Qwen special tokens: {unknown}")
        text = unicodedata.normalize("NFC", text)
        ids = self.vocabulary.encoding.encode(
            text, allowed_special=allowed_special, disallowed_special=disallowed_special
        )
        return [self._convert_id_to_token(token_id) for token_id in ids]

    def _convert_token_to_id(self, token: str) -> int:
        if token in SPECIAL_IDS:
            return SPECIAL_IDS[token]
        if token not in self.vocabulary.id_of_token:
            raise ValueError(f"{token!r} is not a token of the Qwen vocabulary")
        return self.vocabulary.id_of_token[token]

    def _convert_id_to_token(self, index: int) -> str:
        if index in SPECIAL_ID_RANGE:
            return SPECIAL_TOKENS[index - FIRST_SPECIAL_ID]
        if index not in self.vocabulary.token_of_id:
            raise ValueError(self._no_token_message(index))
        return self.vocabulary.token_of_id[index]

    def _no_token_message(self, index: int) -> str:
        extra_count = len(self.vocabulary.extra_ranks)
        extra = f" plus {extra_count} extra tokens" if extra_count else ""
        return (
            f"token id {index} has no token: the Qwen vocabulary has ids 0..{SPECIAL_ID_RANGE[-1]}{extra}, "
            "and ids past it (up to the embedding size 151936) are padding rows that no text maps to. "
            "The ids come from an untrained embedding row or from a different tokenizer."
        )

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        data = b"".join(
            token.encode() if token in SPECIAL_IDS else bytes(BYTE_OF_CHAR[char] for char in token)
            for token in tokens
        )
        return data.decode("utf-8", errors=self.errors)

    def _decode(
        self,
        token_ids: int | list[int],
        skip_special_tokens: bool = False,
        errors: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Bytes of all tokens joined, then UTF-8 decoded (`errors`, default "replace", for split
        characters). The transformers clean-up of spaces does not apply to byte-level BPE."""
        ids = [token_ids] if isinstance(token_ids, int) else [int(token_id) for token_id in token_ids]
        unknown = next((token_id for token_id in ids if token_id not in self.vocabulary.decodable_ids), None)
        if unknown is not None:
            raise ValueError(self._no_token_message(unknown))
        if skip_special_tokens:
            ids = [token_id for token_id in ids if token_id not in SPECIAL_ID_RANGE]
        return self.vocabulary.encoding.decode(ids, errors=errors or self.errors)

    def _add_tokens(self, new_tokens: Iterable[str | AddedToken], special_tokens: bool = False) -> int:
        """Only existing special tokens can be (re)declared; tiktoken's vocabulary is fixed at load."""
        new = [str(token) for token in new_tokens if str(token) not in SPECIAL_IDS]
        if new:
            raise ValueError(
                f"QWenTokenizer cannot add tokens {new}: its vocabulary is fixed. Use one of the existing "
                f"special tokens (e.g. <|extra_0|>) or pass extra_vocab_file= with tiktoken lines "
                f"'base64-token id' using ids from {SPECIAL_ID_RANGE[-1] + 1} on."
            )
        return 0

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str, ...]:
        """Write qwen.tiktoken and, if any, the extra tokens, byte for byte as they were read."""
        prefix = f"{filename_prefix}-" if filename_prefix else ""
        files = [(VOCAB_FILES_NAMES["vocab_file"], self.vocabulary.base_data)]
        if self.vocabulary.extra_data:
            files.append((VOCAB_FILES_NAMES["extra_vocab_file"], self.vocabulary.extra_data))
        written = []
        for name, content in files:
            path = Path(save_directory, prefix + name)
            if not (path.exists() and path.read_bytes() == content):  # e.g. saving back where it was loaded
                path.write_bytes(content)
            written.append(str(path))
        return tuple(written)

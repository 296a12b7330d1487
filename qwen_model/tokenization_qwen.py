"""The Qwen (v1) tokenizer: tiktoken BPE over `qwen.tiktoken`, as a transformers python tokenizer.

A flat module that imports only tiktoken, transformers and the flat `chat_format` module, because it
is copied next to every checkpoint we write and loaded there with `trust_remote_code=True`.

Tokens (as returned by `tokenize` / `convert_ids_to_tokens`) are strings in the usual byte-level
form: every byte of a BPE token is shown as one printable character, so the vocabulary is a plain
`dict[str, int]`. Special tokens keep their own text (`<|im_start|>`).

The tokenizer carries the toolkit's ChatML chat template (`chat_format.CHAT_TEMPLATE`) unless its
tokenizer_config says otherwise, and its encodings answer `char_to_token` / `token_to_chars` (for
`apply_chat_template(..., return_assistant_tokens_mask=True)`), which transformers offers only for
its Rust tokenizers.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import os
import unicodedata
from collections.abc import Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

import tiktoken
from transformers import AddedToken, BatchEncoding, PreTrainedTokenizer
from transformers.tokenization_utils_base import CharSpan

from .chat_format import CHAT_TEMPLATE

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

    def __reduce__(self) -> tuple[Callable[[bytes, bytes], Vocabulary], tuple[bytes, bytes]]:
        return shared_vocabulary, (self.base_data, self.extra_data)


# The vocabulary built last, by file contents. Building one takes most of a second (a fifth of the
# start-up of a tiny run) and every tokenizer of a process normally reads the same files: the training
# tokenizer, a quantizer's second one, the copies `datasets` unpickles. Nothing changes a Vocabulary
# after it is built, so tokenizers can share it.
_LAST_VOCABULARY: dict[tuple[bytes, bytes], Vocabulary] = {}


def shared_vocabulary(
    base_data: bytes, extra_data: bytes = b"", base_source: str = "", extra_source: str = ""
) -> Vocabulary:
    """The Vocabulary of these file contents, built only when they differ from the last ones."""
    key = (base_data, extra_data)
    vocabulary = _LAST_VOCABULARY.get(key)
    if vocabulary is None:
        vocabulary = Vocabulary(base_data, extra_data, base_source, extra_source)
        _LAST_VOCABULARY.clear()
        _LAST_VOCABULARY[key] = vocabulary
    return vocabulary


def nfc_positions(text: str) -> list[int] | None:
    """For each character of `text` (and its end), the index of the same place in its NFC form;
    None when `text` is already NFC (the indices are the same).

    Characters that NFC combines (a letter and its accents, Hangul jamo) share the index of what
    they become, so a lookup inside such a cluster lands on the token of the cluster.
    """
    if unicodedata.is_normalized("NFC", text):
        return None
    clusters: list[str] = []
    for char in text:
        joins = unicodedata.combining(char) or (
            clusters
            and unicodedata.normalize("NFC", clusters[-1] + char)
            != unicodedata.normalize("NFC", clusters[-1]) + unicodedata.normalize("NFC", char)
        )
        if clusters and joins:
            clusters[-1] += char
        else:
            clusters.append(char)
    positions: list[int] = []
    normalized_length = 0
    for cluster in clusters:
        width = len(unicodedata.normalize("NFC", cluster))
        positions += [normalized_length + min(offset, width - 1) for offset in range(len(cluster))]
        normalized_length += width
    if "".join(unicodedata.normalize("NFC", cluster) for cluster in clusters) != unicodedata.normalize(
        "NFC", text
    ):
        raise ValueError(f"cannot map the characters of {text[:50]!r}... to its NFC form")
    return [*positions, normalized_length]


def token_char_spans(tokens: Iterable[bytes]) -> list[tuple[int, int]]:
    """Character span (start, end) of each token of a UTF-8 text given as the tokens' bytes. A
    character split between tokens belongs to the spans of all of them."""
    spans = []
    characters = 0
    for data in tokens:
        starts_inside_a_character = data[0] & 0xC0 == 0x80
        start = characters - 1 if starts_inside_a_character else characters
        characters += sum(1 for byte in data if byte & 0xC0 != 0x80)
        spans.append((start, max(characters, start + 1)))
    return spans


def place_in_row(tokens: Sequence[int], row: Sequence[int], padding_side: str, truncation_side: str) -> int:
    """Where the tokens of a text start in its encoded row, which may be padded or truncated: the row
    position of the first token (negative when the row lost tokens at its start)."""
    if len(row) >= len(tokens):
        padding = len(row) - len(tokens)
        candidates = [padding, 0] if padding_side == "left" else [0, padding]
        for start in [*candidates, *range(1, padding)]:
            if list(row[start : start + len(tokens)]) == list(tokens):
                return start
    elif truncation_side == "left" and list(row) == list(tokens[len(tokens) - len(row) :]):
        return len(row) - len(tokens)
    elif list(row) == list(tokens[: len(row)]):
        return 0
    raise ValueError("the encoded row does not hold the tokens of its text: cannot map characters to tokens")


RowSpans = list[tuple[int, int] | None]


class CharAlignedEncoding(BatchEncoding):
    """A BatchEncoding of texts whose `char_to_token` / `token_to_chars` work as with a Rust tokenizer.

    `spans_of(text, row_ids)` gives each row position's character span in the text (None for
    padding); it runs for a row when that row is first asked about, so encoding costs nothing more.
    """

    def __init__(
        self, encoding: BatchEncoding, texts: list[str], spans_of: Callable[[str, list[int]], RowSpans]
    ) -> None:
        super().__init__(encoding.data, n_sequences=encoding.n_sequences)
        self._texts = texts
        self._spans_of = spans_of
        self._rows: dict[int, tuple[RowSpans, list[int], list[int]]] = {}

    def _row(self, batch_index: int) -> tuple[RowSpans, list[int], list[int]]:
        """The row's spans, and the positions and span ends of its text tokens (for bisection)."""
        if batch_index not in self._rows:
            ids = self.data["input_ids"]
            rows = ids.tolist() if hasattr(ids, "tolist") else ids
            if rows and not isinstance(rows[0], list):
                rows = [rows]
            spans = self._spans_of(self._texts[batch_index], rows[batch_index])
            positions = [position for position, span in enumerate(spans) if span is not None]
            ends = [span[1] for span in spans if span is not None]
            self._rows[batch_index] = (spans, positions, ends)
        return self._rows[batch_index]

    def char_to_token(  # type: ignore[override]  # None where no token holds the character, like Rust's
        self, batch_or_char_index: int, char_index: int | None = None, sequence_index: int = 0
    ) -> int | None:
        """Row position of the token that holds character `char_index` of the text (None if no token does)."""
        batch_index, char_index = (
            (0, batch_or_char_index) if char_index is None else (batch_or_char_index, char_index)
        )
        spans, positions, ends = self._row(batch_index)
        found = bisect.bisect_right(ends, char_index)
        if found == len(positions):
            return None
        span = spans[positions[found]]
        return positions[found] if span is not None and span[0] <= char_index else None

    def token_to_chars(self, batch_or_token_index: int, token_index: int | None = None) -> CharSpan | None:
        """The characters of the text that the token at this row position covers (None for padding)."""
        batch_index, token_index = (
            (0, batch_or_token_index) if token_index is None else (batch_or_token_index, token_index)
        )
        span = self._row(batch_index)[0][token_index]
        return None if span is None else CharSpan(*span)


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
        self.vocabulary = shared_vocabulary(
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
        if kwargs.get("chat_template") is None:  # official checkpoints have none: ChatML as trained
            kwargs["chat_template"] = CHAT_TEMPLATE
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

    def tokenize(  # type: ignore[override]  # tiktoken's special-token switches instead of pairs
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
        ids = self._encode_ids(text, allowed_special, disallowed_special, split_special_tokens)
        return [self._convert_id_to_token(token_id) for token_id in ids]

    def _encode_ids(
        self,
        text: str,
        allowed_special: str | Collection[str] = "all",
        disallowed_special: str | Collection[str] = (),
        split_special_tokens: bool | None = None,
    ) -> list[int]:
        """The ids `tokenize` stands for (same arguments)."""
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
        return self.vocabulary.encoding.encode(
            text,
            allowed_special="all" if allowed_special == "all" else set(allowed_special),
            disallowed_special="all" if disallowed_special == "all" else disallowed_special,
        )

    def _encode_plus(  # type: ignore[override]  # every option goes through to transformers unchanged
        self, text: Any, text_pair: Any = None, **kwargs: Any
    ) -> BatchEncoding:
        """The transformers encoding, able to map characters to tokens when the input is text."""
        encoding = super()._encode_plus(text, text_pair=text_pair, **kwargs)
        texts = [text] if isinstance(text, str) else text
        plain_texts = isinstance(texts, (list, tuple)) and all(isinstance(item, str) for item in texts)
        # Pairs, pre-split words and sanitised chats are encoded in pieces: no single text to map.
        if not plain_texts or text_pair is not None or kwargs.get("is_split_into_words"):
            return encoding
        if kwargs.get("sanitize_control_tokens"):
            return encoding
        options: dict[str, Any] = {
            name: kwargs[name]
            for name in ("allowed_special", "disallowed_special", "split_special_tokens")
            if name in kwargs
        }
        padding_side = kwargs.get("padding_side") or self.padding_side

        def spans_of(text: str, row: list[int]) -> RowSpans:
            return self._row_char_spans(text, row, options, padding_side)

        return CharAlignedEncoding(encoding, list(texts), spans_of)

    def _row_char_spans(
        self, text: str, row: list[int], options: dict[str, Any], padding_side: str
    ) -> RowSpans:
        """Each row position's character span in `text` (None for padding), for the row `text` was
        encoded to (padding and truncation included)."""
        ids = self._encode_ids(text, **options)
        normalized_spans = token_char_spans(
            self.vocabulary.encoding.decode_single_token_bytes(token_id) for token_id in ids
        )
        positions = nfc_positions(text)
        if positions is None:
            spans = normalized_spans
        else:
            spans = [
                (bisect.bisect_left(positions, start), bisect.bisect_left(positions, end))
                for start, end in normalized_spans
            ]
        first = place_in_row(ids, row, padding_side, self.truncation_side)
        return [
            spans[position - first] if 0 <= position - first < len(spans) else None
            for position in range(len(row))
        ]

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
        clean_up_tokenization_spaces: bool | None = None,
        errors: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Bytes of all tokens joined, then UTF-8 decoded (`errors`, default "replace", for split
        characters). The transformers clean-up of spaces (`clean_up_tokenization_spaces`) does not
        apply to byte-level BPE and is ignored."""
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

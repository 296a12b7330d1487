"""QWenTokenizer against the real vocabulary: ids, special-token rules, padding, persistence."""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import pickle
import unicodedata
from pathlib import Path

import pytest
import torch

from qwen_model.tokenization_qwen import QWenTokenizer

OFFICIAL_SHA256 = "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"

ROUND_TRIP_TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog. It's 5 o'clock, isn't it?",
    "chinese": "通义千问是阿里云研发的大语言模型。你好，世界！",
    "code": "def f(x: int) -> int:\n\tif x > 0:\n        return x ** 2  # square\n    return -1\n",
    "emoji": "I ❤️ 🦀 and 👨\u200d👩\u200d👧 families 🎉🎉",
    "digits": "Pi is 3.14159265358979, year 2024年, phone +1-555-0100.",
    "whitespace": "a    b\t\t c  \u3000 d     ",
    "newlines": "line1\n\nline2\r\n\r\n\n   \n  indented\n",
    "mixed_scripts": "Привет, مرحبا, こんにちは, 안녕하세요, नमस्ते",
    "special_text": "say <|im_start|> and <|endoftext|> literally",
}


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS.values(), ids=ROUND_TRIP_TEXTS.keys())
def test_round_trip(tokenizer: QWenTokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode_text(text)) == text
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.convert_tokens_to_string(tokenizer.tokenize(text)) == text


def test_round_trip_on_real_data(tokenizer: QWenTokenizer, shared_data_dir: Path) -> None:
    samples = json.loads((shared_data_dir / "llamafactory_alpaca_zh_demo.json").read_text())[:200]
    samples += json.loads((shared_data_dir / "llamafactory_alpaca_en_demo.json").read_text())[:200]
    for index, sample in enumerate(samples):
        text = "\n".join(sample[field] for field in ("instruction", "input", "output"))
        assert tokenizer.decode(tokenizer.encode_text(text)) == unicodedata.normalize("NFC", text), index


def test_known_ids_of_the_official_vocabulary(tokenizer: QWenTokenizer) -> None:
    assert tokenizer.encode_text("Hello world") == [9707, 1879]
    assert tokenizer.encode_text("你好") == [108386]
    assert tokenizer.tokenize("I'll go") == ["I", "'ll", "Ġgo"]


def test_pretokenisation_splits_digits_and_keeps_space_with_next_word(tokenizer: QWenTokenizer) -> None:
    digits = tokenizer.encode_text("1234567890")
    assert [tokenizer.decode([token_id]) for token_id in digits] == list("1234567890")
    assert [tokenizer.decode([i]) for i in tokenizer.encode_text("a   b")] == ["a", "  ", " b"]
    assert [tokenizer.decode([i]) for i in tokenizer.encode_text("a\n\nb")] == ["a", "\n\n", "b"]


def test_special_token_ids(tokenizer: QWenTokenizer) -> None:
    assert (tokenizer.eod_id, tokenizer.im_start_id, tokenizer.im_end_id) == (151643, 151644, 151645)
    assert len(tokenizer) == tokenizer.vocab_size == 151851
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 151643
    assert tokenizer.convert_tokens_to_ids(["<|extra_0|>", "<|extra_204|>"]) == [151646, 151850]
    assert tokenizer.convert_ids_to_tokens([151644, 151645]) == ["<|im_start|>", "<|im_end|>"]
    assert tokenizer.get_vocab()["<|im_end|>"] == 151645
    assert len(tokenizer.get_vocab()) == 151851
    assert {151643, 151644, 151645} <= set(tokenizer.all_special_ids)


def test_special_text_becomes_special_token_by_default(tokenizer: QWenTokenizer) -> None:
    text = "<|im_start|>user\nhi<|im_end|>"
    assert tokenizer.encode(text)[0] == tokenizer.im_start_id
    assert tokenizer.encode(text)[-1] == tokenizer.im_end_id
    assert tokenizer(text)["input_ids"] == tokenizer.encode_text(text, allow_special=True)


def test_encode_text_treats_special_text_as_plain_text_by_default(tokenizer: QWenTokenizer) -> None:
    ids = tokenizer.encode_text("<|im_start|>user<|endoftext|><|extra_3|>")
    assert not set(ids) & set(range(151643, 151851))
    assert tokenizer.decode(ids) == "<|im_start|>user<|endoftext|><|extra_3|>"


def test_allowed_and_disallowed_special(tokenizer: QWenTokenizer) -> None:
    text = "a<|im_start|>b<|im_end|>"
    plain = tokenizer.encode_text(text)
    assert tokenizer.encode(text, allowed_special=set()) == plain
    assert tokenizer.encode(text, split_special_tokens=True) == plain
    only_start = tokenizer.encode(text, allowed_special={"<|im_start|>"})
    assert tokenizer.im_start_id in only_start and tokenizer.im_end_id not in only_start
    assert tokenizer.decode(only_start) == text
    with pytest.raises(ValueError, match="disallowed special token"):
        tokenizer.encode(text, allowed_special={"<|im_start|>"}, disallowed_special="all")
    with pytest.raises(ValueError, match="not Qwen special tokens"):
        tokenizer.encode(text, allowed_special={"<|im_begin|>"})


def test_nfc_normalisation(tokenizer: QWenTokenizer) -> None:
    decomposed, composed = "cafe\u0301 Åström", "café Åström"
    assert decomposed != composed and unicodedata.normalize("NFC", decomposed) == composed
    assert tokenizer.encode_text(decomposed) == tokenizer.encode_text(composed)
    assert tokenizer.encode(decomposed) == tokenizer.encode(composed)


def test_decode_replaces_broken_utf8_and_skips_special(tokenizer: QWenTokenizer) -> None:
    pieces = tokenizer.encode_text("龘")  # one character split over two byte-level tokens
    assert len(pieces) == 2
    assert tokenizer.decode(pieces[:1]) == "\ufffd"
    ids = [tokenizer.im_start_id, *tokenizer.encode_text("hi"), tokenizer.im_end_id, tokenizer.eod_id]
    assert tokenizer.decode(ids) == "<|im_start|>hi<|im_end|><|endoftext|>"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hi"
    assert tokenizer.decode(torch.tensor(ids)) == tokenizer.decode(ids)


@pytest.mark.parametrize("bad_id", [151851, 151935, 200000, -1])
def test_id_without_token_is_a_value_error_naming_it(tokenizer: QWenTokenizer, bad_id: int) -> None:
    with pytest.raises(ValueError, match=str(bad_id)):
        tokenizer.decode([9707, bad_id])
    with pytest.raises(ValueError, match=str(bad_id)):
        tokenizer.convert_ids_to_tokens([bad_id])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_returns_attention_mask(vocab_file: Path, side: str) -> None:
    tokenizer = QWenTokenizer(vocab_file, padding_side=side)
    batch = tokenizer(["Hello world, how are you?", "Hi"], padding=True, return_tensors="pt")
    short = tokenizer.encode("Hi")
    width = len(tokenizer.encode("Hello world, how are you?"))
    pad = [tokenizer.pad_token_id] * (width - len(short))
    mask = [0] * len(pad)
    expected_ids, expected_mask = (pad + short, mask + [1] * len(short))
    if side == "right":
        expected_ids, expected_mask = (short + pad, [1] * len(short) + mask)
    assert batch["input_ids"][1].tolist() == expected_ids
    assert batch["attention_mask"][1].tolist() == expected_mask
    assert batch["attention_mask"][0].tolist() == [1] * width


def test_adding_tokens_is_refused_but_existing_specials_can_be_declared(vocab_file: Path) -> None:
    tokenizer = QWenTokenizer(vocab_file)
    with pytest.raises(ValueError, match="extra_vocab_file"):
        tokenizer.add_tokens(["<new_token>"])
    assert tokenizer.add_special_tokens({"pad_token": "<|extra_0|>"}) == 0
    assert tokenizer.pad_token_id == 151646


def test_pickle_and_deepcopy_rebuild_the_encoder(tokenizer: QWenTokenizer) -> None:
    text = ROUND_TRIP_TEXTS["special_text"] + ROUND_TRIP_TEXTS["chinese"]
    for clone in (pickle.loads(pickle.dumps(tokenizer)), copy.deepcopy(tokenizer)):
        assert clone.encode(text) == tokenizer.encode(text)
        assert clone.encode_text(text) == tokenizer.encode_text(text)
        assert clone.tokenize(text) == tokenizer.tokenize(text)
        assert clone.decode(tokenizer.encode(text)) == text
        assert len(clone) == 151851


def test_tokenizers_of_the_same_files_share_one_vocabulary(
    tokenizer: QWenTokenizer, vocab_file: Path, tmp_path: Path
) -> None:
    """Building the vocabulary is most of a tokenizer's load; a copy of the file elsewhere (another
    checkpoint) reuses it, a different file does not, and a tokenizer of other files still works."""
    copied = tmp_path / "copy" / "qwen.tiktoken"
    copied.parent.mkdir()
    copied.write_bytes(vocab_file.read_bytes())
    again = QWenTokenizer(copied)
    assert again.vocabulary is QWenTokenizer(vocab_file).vocabulary
    assert pickle.loads(pickle.dumps(again)).vocabulary is again.vocabulary
    assert len(pickle.dumps(again.vocabulary)) < 2 * len(vocab_file.read_bytes())
    extra = tmp_path / "extra.tiktoken"
    extra.write_text(_tiktoken_line("你好世界", 151851))
    extended = QWenTokenizer(vocab_file, extra_vocab_file=extra)
    assert extended.vocabulary is not again.vocabulary
    assert extended.encode_text("你好世界") == [151851]
    assert again.encode_text("你好世界") == tokenizer.encode_text("你好世界") != [151851]
    assert QWenTokenizer(copied).encode_text("你好世界") == tokenizer.encode_text("你好世界")


def test_save_and_reload(tokenizer: QWenTokenizer, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path)
    assert hashlib.sha256((tmp_path / "qwen.tiktoken").read_bytes()).hexdigest() == OFFICIAL_SHA256
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "QWenTokenizer"
    assert config["auto_map"] == {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}
    assert not (tmp_path / "qwen_extra.tiktoken").exists()

    reloaded = QWenTokenizer.from_pretrained(tmp_path)
    text = ROUND_TRIP_TEXTS["special_text"] + ROUND_TRIP_TEXTS["emoji"]
    assert reloaded.encode(text) == tokenizer.encode(text)
    assert reloaded.encode_text(text) == tokenizer.encode_text(text)
    assert (reloaded.pad_token_id, len(reloaded), reloaded.all_special_ids) == (
        tokenizer.pad_token_id,
        len(tokenizer),
        tokenizer.all_special_ids,
    )


def test_reload_rejects_foreign_added_tokens(tokenizer: QWenTokenizer, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["added_tokens_decoder"]["151851"] = {"content": "<tool>", "special": True}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="<tool>"):
        QWenTokenizer.from_pretrained(tmp_path)


def _tiktoken_line(text: str, token_id: int) -> str:
    return f"{base64.b64encode(text.encode()).decode()} {token_id}\n"


def test_extra_vocab_adds_tokens_at_unused_ids(
    tokenizer: QWenTokenizer, vocab_file: Path, tmp_path: Path
) -> None:
    # "你好" and "世界" are single tokens, so BPE can merge them into the new token.
    assert len(tokenizer.encode_text("你好世界")) == 2
    extra = tmp_path / "extra.tiktoken"
    extra.write_text(_tiktoken_line("你好世界", 151851) + _tiktoken_line("世界你好", 151860))
    extended = QWenTokenizer(vocab_file, extra_vocab_file=extra)

    assert extended.encode_text("说你好世界") == [*tokenizer.encode_text("说"), 151851]
    assert extended.decode([151851, 151860]) == "你好世界世界你好"
    assert len(extended) == 151861
    with pytest.raises(ValueError, match="151855"):
        extended.decode([151855])
    assert extended.encode_text("hello <|im_end|>", allow_special=True) == tokenizer.encode_text(
        "hello <|im_end|>", allow_special=True
    )
    assert pickle.loads(pickle.dumps(extended)).encode_text("你好世界") == [151851]

    save_dir = tmp_path / "saved"
    extended.save_pretrained(save_dir)
    assert (save_dir / "qwen_extra.tiktoken").read_text() == extra.read_text()
    assert hashlib.sha256((save_dir / "qwen.tiktoken").read_bytes()).hexdigest() == OFFICIAL_SHA256
    assert QWenTokenizer.from_pretrained(save_dir).encode_text("你好世界") == [151851]


@pytest.mark.parametrize(
    ("extra_lines", "message"),
    [
        (_tiktoken_line("hello", 151900), "already in the vocabulary with id 14990"),
        (_tiktoken_line("你好世界", 100), "collides with an existing id"),
        (_tiktoken_line("你好世界", 151700), "collides with an existing id"),
        (_tiktoken_line("<|im_end|>", 151900), "text of a special token"),
        (
            _tiktoken_line("你好世界", 151900) + _tiktoken_line("世界你好", 151900),
            "line 2: rank 151900 already used",
        ),
        (_tiktoken_line("你好世界", 151900) + "not-base64!! 151901\n", "line 2: cannot parse"),
        ("5L2g 151900 extra\n", "line 1: cannot parse .*expected 'base64-token rank'"),
    ],
    ids=["token-exists", "base-id", "special-id", "special-text", "duplicate-id", "bad-base64", "bad-fields"],
)
def test_extra_vocab_errors(vocab_file: Path, tmp_path: Path, extra_lines: str, message: str) -> None:
    extra = tmp_path / "extra.tiktoken"
    extra.write_text(extra_lines)
    with pytest.raises(ValueError, match=message):
        QWenTokenizer(vocab_file, extra_vocab_file=extra)


def test_foreign_vocabulary_is_rejected(tmp_path: Path) -> None:
    vocab = tmp_path / "other.tiktoken"
    vocab.write_text(_tiktoken_line("a", 0) + _tiktoken_line("b", 151643))
    with pytest.raises(ValueError, match="not a Qwen vocabulary"):
        QWenTokenizer(vocab)


def test_dataset_fingerprint_does_not_change_with_use(tokenizer: QWenTokenizer, vocab_file: Path) -> None:
    """`datasets` hashes the tokenizer to key its map() cache: using it must not change the hash."""
    from datasets.fingerprint import Hasher

    before = Hasher.hash(tokenizer)
    tokenizer.tokenize("hello <|im_start|>")
    tokenizer(["a b", "c"], padding=True)
    tokenizer.decode([9707, 151643])
    tokenizer.encode_text("world")
    assert Hasher.hash(tokenizer) == before == Hasher.hash(QWenTokenizer(vocab_file))


def _char_map(encoding, text: str, row: int = 0) -> list[int | None]:
    return [encoding.char_to_token(row, index) for index in range(len(text))]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS.values(), ids=ROUND_TRIP_TEXTS.keys())
def test_characters_map_to_the_tokens_that_hold_them(tokenizer: QWenTokenizer, text: str) -> None:
    """char_to_token / token_to_chars, as Rust tokenizers offer them (apply_chat_template's assistant
    masks need them): each token's span decodes to text containing that token's own text."""
    encoding = tokenizer(text)
    ids = encoding["input_ids"]
    spans = [encoding.token_to_chars(position) for position in range(len(ids))]
    assert spans[0].start == 0 and spans[-1].end == len(text)
    for position, span in enumerate(spans):
        piece = tokenizer.decode([ids[position]], errors="ignore")
        assert piece in text[span.start : span.end]
        holder = encoding.char_to_token(span.start)  # the first token of a character split between several
        assert holder <= position and encoding.token_to_chars(holder).start <= span.start
    holders = _char_map(encoding, text)
    assert holders == sorted(holders) and None not in holders


def test_character_map_of_a_character_split_between_tokens(tokenizer: QWenTokenizer) -> None:
    text = "a龘b"  # the rare character takes several byte-level tokens
    encoding = tokenizer(text)
    assert len(encoding["input_ids"]) > 3
    middle = [
        position
        for position in range(len(encoding["input_ids"]))
        if encoding.token_to_chars(position) == (1, 2)
    ]
    assert len(middle) > 1 and encoding.char_to_token(1) == middle[0]


@pytest.mark.parametrize("side", ["right", "left"])
def test_character_map_skips_padding_and_follows_truncation(vocab_file: Path, side: str) -> None:
    tokenizer = QWenTokenizer(vocab_file, padding_side=side, truncation_side=side)
    texts = ["short one", "a somewhat longer second text"]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    for row, text in enumerate(texts):
        real = batch["attention_mask"][row].nonzero().flatten().tolist()
        assert _char_map(batch, text, row)[0] == real[0] and _char_map(batch, text, row)[-1] == real[-1]
        assert all(
            batch.token_to_chars(row, position) is None
            for position in range(batch["input_ids"].shape[1])
            if position not in real
        )
    whole = tokenizer(texts[1])["input_ids"]
    cut = tokenizer(texts[1], truncation=True, max_length=3)
    holders = _char_map(cut, texts[1])
    kept = whole[:3] if side == "right" else whole[-3:]
    assert cut["input_ids"] == kept
    assert sorted({holder for holder in holders if holder is not None}) == [0, 1, 2]
    assert (holders[0] is None) == (side == "left") and (holders[-1] is None) == (side == "right")


def test_character_map_of_text_that_nfc_changes(tokenizer: QWenTokenizer) -> None:
    text = "Cafe\u0301 au lait"  # "é" written as e + combining accent: NFC makes it one character
    encoding = tokenizer(text)
    assert tokenizer.decode(encoding["input_ids"]) == unicodedata.normalize("NFC", text)
    lait = text.index("lait")
    assert encoding.token_to_chars(encoding.char_to_token(lait)).start == lait - 1  # " lait"
    assert encoding.char_to_token(3) == encoding.char_to_token(4)  # the e and its accent

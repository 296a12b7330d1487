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


@pytest.fixture(scope="module")
def tok(vocab_file: Path) -> QWenTokenizer:
    return QWenTokenizer(vocab_file)


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS.values(), ids=ROUND_TRIP_TEXTS.keys())
def test_round_trip(tok: QWenTokenizer, text: str) -> None:
    assert tok.decode(tok.encode_text(text)) == text
    assert tok.decode(tok.encode(text)) == text
    assert tok.convert_tokens_to_string(tok.tokenize(text)) == text


def test_round_trip_on_real_data(tok: QWenTokenizer, shared_data_dir: Path) -> None:
    samples = json.loads((shared_data_dir / "llamafactory_alpaca_zh_demo.json").read_text())[:200]
    samples += json.loads((shared_data_dir / "llamafactory_alpaca_en_demo.json").read_text())[:200]
    for index, sample in enumerate(samples):
        text = "\n".join(sample[field] for field in ("instruction", "input", "output"))
        assert tok.decode(tok.encode_text(text)) == unicodedata.normalize("NFC", text), index


def test_known_ids_of_the_official_vocabulary(tok: QWenTokenizer) -> None:
    assert tok.encode_text("Hello world") == [9707, 1879]
    assert tok.encode_text("你好") == [108386]
    assert tok.tokenize("I'll go") == ["I", "'ll", "Ġgo"]


def test_pretokenisation_splits_digits_and_keeps_space_with_next_word(tok: QWenTokenizer) -> None:
    digits = tok.encode_text("1234567890")
    assert [tok.decode([token_id]) for token_id in digits] == list("1234567890")
    assert [tok.decode([i]) for i in tok.encode_text("a   b")] == ["a", "  ", " b"]
    assert [tok.decode([i]) for i in tok.encode_text("a\n\nb")] == ["a", "\n\n", "b"]


def test_special_token_ids(tok: QWenTokenizer) -> None:
    assert (tok.eod_id, tok.im_start_id, tok.im_end_id) == (151643, 151644, 151645)
    assert len(tok) == tok.vocab_size == 151851
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id == 151643
    assert tok.convert_tokens_to_ids(["<|extra_0|>", "<|extra_204|>"]) == [151646, 151850]
    assert tok.convert_ids_to_tokens([151644, 151645]) == ["<|im_start|>", "<|im_end|>"]
    assert tok.get_vocab()["<|im_end|>"] == 151645
    assert len(tok.get_vocab()) == 151851
    assert {151643, 151644, 151645} <= set(tok.all_special_ids)


def test_special_text_becomes_special_token_by_default(tok: QWenTokenizer) -> None:
    text = "<|im_start|>user\nhi<|im_end|>"
    assert tok.encode(text)[0] == tok.im_start_id
    assert tok.encode(text)[-1] == tok.im_end_id
    assert tok(text)["input_ids"] == tok.encode_text(text, allow_special=True)


def test_encode_text_treats_special_text_as_plain_text_by_default(tok: QWenTokenizer) -> None:
    ids = tok.encode_text("<|im_start|>user<|endoftext|><|extra_3|>")
    assert not set(ids) & set(range(151643, 151851))
    assert tok.decode(ids) == "<|im_start|>user<|endoftext|><|extra_3|>"


def test_allowed_and_disallowed_special(tok: QWenTokenizer) -> None:
    text = "a<|im_start|>b<|im_end|>"
    plain = tok.encode_text(text)
    assert tok.encode(text, allowed_special=set()) == plain
    assert tok.encode(text, split_special_tokens=True) == plain
    only_start = tok.encode(text, allowed_special={"<|im_start|>"})
    assert tok.im_start_id in only_start and tok.im_end_id not in only_start
    assert tok.decode(only_start) == text
    with pytest.raises(ValueError, match="disallowed special token"):
        tok.encode(text, allowed_special={"<|im_start|>"}, disallowed_special="all")
    with pytest.raises(ValueError, match="not Qwen special tokens"):
        tok.encode(text, allowed_special={"<|im_begin|>"})


def test_nfc_normalisation(tok: QWenTokenizer) -> None:
    decomposed, composed = "cafe\u0301 Åström", "café Åström"
    assert decomposed != composed and unicodedata.normalize("NFC", decomposed) == composed
    assert tok.encode_text(decomposed) == tok.encode_text(composed)
    assert tok.encode(decomposed) == tok.encode(composed)


def test_decode_replaces_broken_utf8_and_skips_special(tok: QWenTokenizer) -> None:
    pieces = tok.encode_text("龘")  # one character split over two byte-level tokens
    assert len(pieces) == 2
    assert tok.decode(pieces[:1]) == "\ufffd"
    ids = [tok.im_start_id, *tok.encode_text("hi"), tok.im_end_id, tok.eod_id]
    assert tok.decode(ids) == "<|im_start|>hi<|im_end|><|endoftext|>"
    assert tok.decode(ids, skip_special_tokens=True) == "hi"
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids)


@pytest.mark.parametrize("bad_id", [151851, 151935, 200000, -1])
def test_id_without_token_is_a_value_error_naming_it(tok: QWenTokenizer, bad_id: int) -> None:
    with pytest.raises(ValueError, match=str(bad_id)):
        tok.decode([9707, bad_id])
    with pytest.raises(ValueError, match=str(bad_id)):
        tok.convert_ids_to_tokens([bad_id])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_returns_attention_mask(vocab_file: Path, side: str) -> None:
    tok = QWenTokenizer(vocab_file, padding_side=side)
    batch = tok(["Hello world, how are you?", "Hi"], padding=True, return_tensors="pt")
    short = tok.encode("Hi")
    width = len(tok.encode("Hello world, how are you?"))
    pad = [tok.pad_token_id] * (width - len(short))
    mask = [0] * len(pad)
    expected_ids, expected_mask = (pad + short, mask + [1] * len(short))
    if side == "right":
        expected_ids, expected_mask = (short + pad, [1] * len(short) + mask)
    assert batch["input_ids"][1].tolist() == expected_ids
    assert batch["attention_mask"][1].tolist() == expected_mask
    assert batch["attention_mask"][0].tolist() == [1] * width


def test_adding_tokens_is_refused_but_existing_specials_can_be_declared(vocab_file: Path) -> None:
    tok = QWenTokenizer(vocab_file)
    with pytest.raises(ValueError, match="extra_vocab_file"):
        tok.add_tokens(["<new_token>"])
    assert tok.add_special_tokens({"pad_token": "<|extra_0|>"}) == 0
    assert tok.pad_token_id == 151646


def test_pickle_and_deepcopy_rebuild_the_encoder(tok: QWenTokenizer) -> None:
    text = ROUND_TRIP_TEXTS["special_text"] + ROUND_TRIP_TEXTS["chinese"]
    for clone in (pickle.loads(pickle.dumps(tok)), copy.deepcopy(tok)):
        assert clone.encode(text) == tok.encode(text)
        assert clone.encode_text(text) == tok.encode_text(text)
        assert clone.tokenize(text) == tok.tokenize(text)
        assert clone.decode(tok.encode(text)) == text
        assert len(clone) == 151851


def test_save_and_reload(tok: QWenTokenizer, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    assert hashlib.sha256((tmp_path / "qwen.tiktoken").read_bytes()).hexdigest() == OFFICIAL_SHA256
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "QWenTokenizer"
    assert config["auto_map"] == {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}
    assert not (tmp_path / "qwen_extra.tiktoken").exists()

    reloaded = QWenTokenizer.from_pretrained(tmp_path)
    text = ROUND_TRIP_TEXTS["special_text"] + ROUND_TRIP_TEXTS["emoji"]
    assert reloaded.encode(text) == tok.encode(text)
    assert reloaded.encode_text(text) == tok.encode_text(text)
    assert (reloaded.pad_token_id, len(reloaded), reloaded.all_special_ids) == (
        tok.pad_token_id,
        len(tok),
        tok.all_special_ids,
    )


def test_reload_rejects_foreign_added_tokens(tok: QWenTokenizer, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["added_tokens_decoder"]["151851"] = {"content": "<tool>", "special": True}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="<tool>"):
        QWenTokenizer.from_pretrained(tmp_path)


def _tiktoken_line(text: str, token_id: int) -> str:
    return f"{base64.b64encode(text.encode()).decode()} {token_id}\n"


def test_extra_vocab_adds_tokens_at_unused_ids(tok: QWenTokenizer, vocab_file: Path, tmp_path: Path) -> None:
    # "你好" and "世界" are single tokens, so BPE can merge them into the new token.
    assert len(tok.encode_text("你好世界")) == 2
    extra = tmp_path / "extra.tiktoken"
    extra.write_text(_tiktoken_line("你好世界", 151851) + _tiktoken_line("世界你好", 151860))
    extended = QWenTokenizer(vocab_file, extra_vocab_file=extra)

    assert extended.encode_text("说你好世界") == [*tok.encode_text("说"), 151851]
    assert extended.decode([151851, 151860]) == "你好世界世界你好"
    assert len(extended) == 151861
    with pytest.raises(ValueError, match="151855"):
        extended.decode([151855])
    assert extended.encode_text("hello <|im_end|>", allow_special=True) == tok.encode_text(
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


def test_dataset_fingerprint_does_not_change_with_use(tok: QWenTokenizer, vocab_file: Path) -> None:
    """`datasets` hashes the tokenizer to key its map() cache: using it must not change the hash."""
    from datasets.fingerprint import Hasher

    before = Hasher.hash(tok)
    tok.tokenize("hello <|im_start|>")
    tok(["a b", "c"], padding=True)
    tok.decode([9707, 151643])
    tok.encode_text("world")
    assert Hasher.hash(tok) == before == Hasher.hash(QWenTokenizer(vocab_file))

"""gpt.tokenizer and gpt.data: the character tokenizer, tiny Shakespeare, batches, bad data."""
import hashlib
import io
import urllib.error

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import gpt.data as data_mod
from gpt import (DATA_SHA256, DATA_URL, DEFAULT_DATA_PATH, PROJECT_ROOT, CharDataset, CharTokenizer,
                 DataError, get_batch, load_text)


def assert_one_line(err):
    msg = str(err.value)
    assert msg and "\n" not in msg, f"not a one-line message: {msg!r}"
    return msg


# ---------------------------------------------------------------- tokenizer
def test_vocabulary_is_the_sorted_set_of_characters():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == [" ", "d", "e", "h", "l", "o", "r", "w"]
    assert tok.vocab_size == 8
    assert tok.encode("hello") == [3, 2, 4, 4, 5]
    assert tok.decode([3, 2, 4, 4, 5]) == "hello"
    assert tok.decode(np.array([7, 5], dtype=np.uint8)) == "wo"
    assert tok.decode([]) == ""


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=60), st.text(max_size=60))
def test_encode_decode_roundtrip(vocab_text, extra):
    tok = CharTokenizer.from_text(vocab_text + extra)
    text = extra + vocab_text
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    np.testing.assert_array_equal(tok.encode_array(text), ids)


def test_json_save_and_load(tmp_path):
    tok = CharTokenizer.from_text("To be, or not to be: é\n")
    again = CharTokenizer.from_json(tok.to_json())
    assert again == tok and again.chars == tok.chars
    path = tmp_path / "tok.json"
    tok.save(path)
    loaded = CharTokenizer.load(path)
    assert loaded.chars == tok.chars
    assert loaded.encode("not é") == tok.encode("not é")


@pytest.mark.parametrize("bad", ["{not json", '{"type": "bpe", "chars": ["a"]}', '["a", "b"]',
                                 '{"type": "char", "chars": ["b", "a"]}',
                                 '{"type": "char", "chars": ["ab"]}'])
def test_bad_json_is_a_clear_error(bad):
    with pytest.raises(ValueError) as err:
        CharTokenizer.from_json(bad)
    assert_one_line(err)


def test_unknown_characters_are_named():
    tok = CharTokenizer.from_text("abc")
    for encode in (tok.encode, tok.encode_array):
        with pytest.raises(ValueError) as err:
            encode("aébZcé")
        assert assert_one_line(err) == "2 distinct characters not in the vocabulary: 'é', 'Z'"
    # many: counted, the first ten shown (a whole alphabet would make a line thousands long)
    with pytest.raises(ValueError) as err:
        tok.encode_array("".join(map(chr, range(0x4E00, 0x4E00 + 5000))))
    assert assert_one_line(err) == ("5000 distinct characters not in the vocabulary: "
                                    + ", ".join(repr(chr(c)) for c in range(0x4E00, 0x4E0A)) + ", ...")
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 3\)"):
        tok.decode([0, 3])
    # a dataset encoded with a given tokenizer (from a checkpoint) reports them as a DataError
    with pytest.raises(DataError) as err:
        CharDataset("abcZ", tokenizer=tok)
    assert assert_one_line(err) == "the text has 1 distinct characters not in the vocabulary: 'Z'"
    np.testing.assert_array_equal(CharDataset("cab", tokenizer=tok).data, [2, 0, 1])


# ---------------------------------------------------------------- tiny Shakespeare
@pytest.fixture(scope="module")
def shakespeare():
    return load_text()  # the default dataset (downloaded only if missing)


def test_tiny_shakespeare_facts(shakespeare):
    assert DEFAULT_DATA_PATH == PROJECT_ROOT / "data" / "tinyshakespeare" / "input.txt"
    assert hashlib.sha256(DEFAULT_DATA_PATH.read_bytes()).hexdigest() == DATA_SHA256
    assert len(shakespeare) == 1_115_394
    ds = CharDataset(shakespeare)
    tok = ds.tokenizer
    assert tok.vocab_size == ds.vocab_size == 65
    assert tok.encode("First Cit") == [18, 47, 56, 57, 58, 1, 15, 47, 58]
    assert tok.chars[:2] == ["\n", " "]
    assert ds.data.dtype == np.uint8 and len(ds.data) == 1_115_394
    assert len(ds.train) == 1_003_854 and len(ds.val) == 111_540
    np.testing.assert_array_equal(ds.data[:1000], tok.encode(shakespeare[:1000]))
    assert tok.decode(ds.val[:20]) == shakespeare[1_003_854:1_003_874]


def test_existing_default_dataset_is_not_downloaded_again(monkeypatch, shakespeare):
    def no_network(*a, **k):
        raise AssertionError("urlopen called although the file is there")
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    assert load_text() == shakespeare


# ---------------------------------------------------------------- batches
def test_get_batch_shapes_shift_and_rng():
    text = "".join(chr(ord("a") + i % 26) for i in range(500))
    ds = CharDataset(text)
    B, T = 6, 10
    x, y = ds.get_batch("train", B, T, np.random.default_rng(7))
    assert x.shape == y.shape == (B, T) and x.dtype == y.dtype == np.int64
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    # drawn as the lecture does: starts uniform in [0, len - T), with rng.integers
    ix = np.random.default_rng(7).integers(0, len(ds.train) - T, size=B)
    np.testing.assert_array_equal(x, ds.train[ix[:, None] + np.arange(T)])
    np.testing.assert_array_equal(y, ds.train[ix[:, None] + np.arange(T) + 1])
    # the same seed gives the same batch, another seed another one
    x2, _ = ds.get_batch("train", B, T, np.random.default_rng(7))
    x3, _ = ds.get_batch("train", B, T, np.random.default_rng(8))
    np.testing.assert_array_equal(x, x2)
    assert not np.array_equal(x, x3)
    xv, yv = ds.get_batch("val", B, T, np.random.default_rng(7))
    assert xv.max() < ds.vocab_size and len(ds.val) == 50
    with pytest.raises(ValueError, match="split must be 'train' or 'val'"):
        ds.get_batch("test", B, T, np.random.default_rng(0))


def test_get_batch_uses_every_start_including_the_last():
    data = np.arange(12, dtype=np.uint8)
    x, y = get_batch(data, 2000, 11, np.random.default_rng(0))
    np.testing.assert_array_equal(x[0], np.arange(11))  # only one start fits: 0
    np.testing.assert_array_equal(y[0], np.arange(1, 12))
    x, _ = get_batch(data, 2000, 4, np.random.default_rng(0))
    assert sorted(set(x[:, 0].tolist())) == list(range(8))  # starts 0 .. len - T - 1


def test_compact_dtype_for_large_vocabularies():
    text = "".join(chr(0x4E00 + i) for i in range(300)) * 2
    ds = CharDataset(text)
    assert ds.vocab_size == 300 and ds.data.dtype == np.uint16
    assert ds.tokenizer.decode(ds.data) == text


def test_too_short_text_is_a_clear_error():
    ds = CharDataset("abcdefghij" * 3)  # 27 train and 3 val tokens
    ds.check_block_size(2)
    with pytest.raises(DataError) as err:
        ds.check_block_size(8)
    msg = assert_one_line(err)
    assert "block_size 8" in msg and "val split has 3 tokens" in msg
    with pytest.raises(DataError):
        ds.get_batch("val", 2, 8, np.random.default_rng(0))
    with pytest.raises(DataError) as err:
        ds.check_block_size(40)
    assert "train split has 27 tokens" in assert_one_line(err)
    with pytest.raises(DataError):
        CharDataset("")


# ---------------------------------------------------------------- bad files
def test_missing_empty_and_non_utf8_files(tmp_path):
    cases = {"missing.txt": None, "empty.txt": b"", "latin1.txt": "caf\xe9".encode("latin-1")}
    expected = {"missing.txt": "not found", "empty.txt": "empty", "latin1.txt": "not UTF-8"}
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(DataError) as err:
            load_text(path)
        msg = assert_one_line(err)
        assert expected[name] in msg and str(path) in msg
    with pytest.raises(DataError, match="not a file"):
        load_text(tmp_path)
    good = tmp_path / "good.txt"
    good.write_text("héllo\n", encoding="utf-8")
    assert load_text(str(good)) == "héllo\n"


# ---------------------------------------------------------------- the download, offline
class FakeResponse(io.BytesIO):
    def __init__(self, payload):
        super().__init__(payload)
        self.headers = {"Content-Length": str(len(payload))}


@pytest.fixture
def fake_default(tmp_path, monkeypatch):
    """DEFAULT_DATA_PATH moved into tmp_path; returns (path, payload, record of urlopen calls)."""
    path = tmp_path / "data" / "tinyshakespeare" / "input.txt"
    payload = ("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 2000).encode()
    calls = []

    def urlopen(url, timeout=None):
        calls.append(url)
        return FakeResponse(payload)

    monkeypatch.setattr(data_mod, "DEFAULT_DATA_PATH", path)
    monkeypatch.setattr("urllib.request.urlopen", urlopen)
    return path, payload, calls


def test_download_success_checks_sha256(fake_default, monkeypatch):
    path, payload, calls = fake_default
    monkeypatch.setattr(data_mod, "DATA_SHA256", hashlib.sha256(payload).hexdigest())
    text = load_text()
    assert calls == [DATA_URL]
    assert text == payload.decode() and path.read_bytes() == payload
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind
    assert load_text() == text and len(calls) == 1  # the second time it is read from disk


def test_download_with_wrong_sha256_stores_nothing(fake_default):
    path, payload, calls = fake_default  # DATA_SHA256 is the real one: the payload does not match
    with pytest.raises(DataError) as err:
        load_text()
    msg = assert_one_line(err)
    assert hashlib.sha256(payload).hexdigest() in msg and DATA_SHA256 in msg
    assert DATA_URL in msg and str(path) in msg
    assert not path.exists() and list(path.parent.iterdir()) == []


@pytest.mark.parametrize("failure", [urllib.error.URLError("[Errno -3] Temporary failure in name resolution"),
                                     TimeoutError("timed out"), ConnectionResetError("reset\nby peer")])
def test_offline_download_names_the_url_and_the_path(fake_default, monkeypatch, failure):
    path, _, _ = fake_default

    def offline(url, timeout=None):
        raise failure

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(DataError) as err:
        load_text()
    msg = assert_one_line(err)
    assert DATA_URL in msg and str(path) in msg and "could not download" in msg
    assert not path.exists() and list(path.parent.iterdir()) == []

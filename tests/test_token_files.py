"""Token files (gpt/token_files.py): a text tokenized once, streaming, into train.bin / val.bin
with a manifest, reused while it checks out and rebuilt when anything differs."""
import json
import os

import numpy as np
import pytest

from gpt import token_files as T
from gpt.data import CharDataset, DataError
from gpt.tokenizer import CharTokenizer

SHAKESPEARE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "data", "tinyshakespeare", "input.txt")


def unicode_text(n_lines=300, seed=0):
    rng = np.random.default_rng(seed)
    words = ["naïve", "café", "日本語", "Ελληνικά", "emoji 😀", "tab\there", "ß", "plain", "ЖЖ", "x"]
    return "".join(" ".join(rng.choice(words, size=6)) + "\n" for _ in range(n_lines))


def write(tmp_path, text, name="t.txt"):
    p = tmp_path / name
    p.write_bytes(text.encode("utf-8"))
    return p


def build(path, folder, spec=T.TokenizerSpec("char")):
    said = []
    T.build_token_files(path, folder, spec, main=False, say=said.append)
    return said


@pytest.mark.parametrize("block", [7, 64, 1 << 20])
def test_blocks_cover_the_text_and_end_at_chunk_boundaries(tmp_path, block):
    text = unicode_text()
    blocks = list(T.read_blocks(write(tmp_path, text), block_bytes=block))
    assert "".join(blocks) == text
    assert len(blocks) > 1 or block > len(text)
    if block >= 64:  # every cut after a newline that starts a word (lines here are shorter)
        assert all(b.endswith("\n") for b in blocks[:-1])
    else:  # lines longer than 4 blocks: cut where the block ends
        assert any(not b.endswith("\n") for b in blocks)


def test_a_byte_that_is_not_utf8_is_named_with_its_offset(tmp_path):
    raw = ("é" * 5000 + "\n").encode("utf-8")
    p = tmp_path / "bad.txt"
    p.write_bytes(raw + b"abc\xff\n")
    with pytest.raises(DataError, match=rf"not UTF-8 text: .*bad.txt \(byte {len(raw) + 3} is 0xff\)"):
        list(T.read_blocks(p, block_bytes=1000))
    p.write_bytes(raw + "é".encode("utf-8")[:1])  # cut in the middle of a character at the end
    with pytest.raises(DataError, match=rf"byte {len(raw)} is 0xc3"):
        list(T.read_blocks(p, block_bytes=1000))


def test_streamed_vocabulary_is_the_texts(tmp_path):
    text = unicode_text()
    assert T.char_vocabulary(write(tmp_path, text), main=False) == CharTokenizer.from_text(text)


@pytest.mark.parametrize("source", ["shakespeare", "unicode"])
def test_char_token_files_give_the_in_memory_batches(tmp_path, source, monkeypatch):
    if source == "shakespeare":
        if not os.path.exists(SHAKESPEARE):
            pytest.skip("tiny Shakespeare is not in data/ (it is in CI)")
        path = SHAKESPEARE
        text = open(path, encoding="utf-8").read()
    else:
        text = unicode_text(2000)
        path = write(tmp_path, text)
        monkeypatch.setattr(T, "BLOCK_BYTES", 4096)  # many blocks
    build(path, tmp_path / "tok")
    ds, ref = T.TokenDataset(tmp_path / "tok"), CharDataset(text)
    assert ds.tokenizer == ref.tokenizer
    assert isinstance(ds.train, np.memmap) and ds.train.dtype == np.uint16
    np.testing.assert_array_equal(ds.train, ref.train)
    np.testing.assert_array_equal(ds.val, ref.val)
    for split in ("train", "val"):
        for seed in range(3):
            a = ds.get_batch(split, 8, 32, np.random.default_rng(seed))
            b = ref.get_batch(split, 8, 32, np.random.default_rng(seed))
            assert a[0].dtype == np.int64
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])
    assert sorted(os.listdir(tmp_path / "tok")) == ["manifest.json", "train.bin", "val.bin"]


def test_a_vocabulary_beyond_uint16_takes_uint32(tmp_path):
    codes = [c for c in range(0x21, 0x21 + 70000) if not 0xD800 <= c <= 0xDFFF]
    text = "".join(map(chr, codes)) * 2
    build(write(tmp_path, text), tmp_path / "tok")
    ds = T.TokenDataset(tmp_path / "tok")
    assert ds.vocab_size == len(codes) > 65536 and ds.train.dtype == np.uint32
    np.testing.assert_array_equal(ds.train, CharDataset(text).train)


def test_reused_while_they_check_out_and_rebuilt_when_not(tmp_path):
    text = unicode_text()
    path, folder = write(tmp_path, text), tmp_path / "tok"
    assert build(path, folder)[-1].startswith("tokens: ")
    stamp = os.stat(folder / "train.bin").st_mtime_ns
    assert build(path, folder) == []  # reused: nothing said, nothing written
    assert os.stat(folder / "train.bin").st_mtime_ns == stamp
    os.utime(path, ns=(1, 1))  # touched, same bytes: still reused
    assert build(path, folder) == []

    def rebuilt(why):
        said = build(path, folder)
        assert said and said[0].startswith(f"tokens: rebuilding {folder} ({why}"), said
        np.testing.assert_array_equal(T.TokenDataset(folder).train, CharDataset(path.read_text("utf-8")).train)
    path.write_bytes(text[::-1].encode("utf-8"))  # same size and characters, other text
    rebuilt("the text changed")
    raw = bytearray((folder / "train.bin").read_bytes())
    raw[10] ^= 1
    (folder / "train.bin").write_bytes(bytes(raw))
    rebuilt(f"{folder / 'train.bin'} does not match its checksum")
    with open(folder / "val.bin", "ab") as f:
        f.write(b"\0\0")
    rebuilt(f"{folder / 'val.bin'} is missing or of the wrong size")
    (folder / "manifest.json").write_text("{not json", encoding="utf-8")
    rebuilt(f"{folder / 'manifest.json'} is unreadable")
    m = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    m["train"]["tokens"] = "many"
    (folder / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
    rebuilt(f"{folder / 'manifest.json'} is not a token-file manifest")
    other = write(tmp_path, text, "other.txt")
    said = build(other, folder)
    assert "they were made from" in said[0]
    # a tokenizer given (a checkpoint's) that differs from the files'
    given = CharTokenizer(sorted(set(text) | {"#"}))
    said = build(other, folder, T.TokenizerSpec(tokenizer=given))
    assert "another tokenizer than the given CharTokenizer" in said[0]
    assert T.TokenDataset(folder).tokenizer == given
    assert not [n for n in os.listdir(folder) if n.endswith(".tmp")]
    # what a killed build leaves is removed by the next one; other files are left alone
    for name in (".tokens.abc123.tmp", ".val.bin.x_Y9.tmp", "notes.tmp"):
        (folder / name).write_bytes(b"x")
    assert build(other, folder, T.TokenizerSpec(tokenizer=given)) == []
    assert sorted(os.listdir(folder)) == ["manifest.json", "notes.tmp", "train.bin", "val.bin"]


def test_a_given_vocabulary_that_lacks_characters_is_a_data_error(tmp_path):
    path = write(tmp_path, "abc\n" * 10 + "é")
    with pytest.raises(DataError, match="not in the vocabulary"):
        build(path, tmp_path / "tok", T.TokenizerSpec(tokenizer=CharTokenizer(list("\nabc"))))
    assert not [n for n in os.listdir(tmp_path / "tok") if n.endswith(".tmp")]


def test_too_short_and_empty(tmp_path):
    build(write(tmp_path, "abcdefghij" * 3), tmp_path / "tok")
    ds = T.TokenDataset(tmp_path / "tok")
    assert (len(ds.train), len(ds.val)) == (27, 3)
    with pytest.raises(DataError, match="too short for block_size 8: its val split has 3 tokens"):
        ds.check_block_size(8)
    (tmp_path / "e.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        build(tmp_path / "e.txt", tmp_path / "tok2")

"""gpt.tokenizer.BPETokenizer: learned merges, tiktoken's encoding rule, round trips, JSON, errors.

The reference is a tiktoken.Encoding built here from the tokenizer's merges, pattern and special
tokens (no download): the plain Python path and the tiktoken path must both give its ids.
"""
import inspect
import json
import re
import sys

import numpy as np
import pytest
import tiktoken
from hypothesis import given, settings
from hypothesis import strategies as st
from tiktoken_ext import openai_public

from gpt import load_text
from gpt.tokenizer import PATTERNS, BPETokenizer, CharTokenizer, tokenizer_from_json
from train.checkpoint import CheckpointError, load_tokenizer

SPECIALS = ["<|endoftext|>", "<|pad|>"]

MULTILINGUAL = (
    "The quick brown fox doesn't jump; it's 12345678 km/h!  I'LL   see you'RE there...\n"
    "中文的分词很有意思：我们今天学习字节对编码。北京欢迎你！\n"
    "বাংলা ভাষা একটি সুন্দর ভাষা। আমি তোমাকে ভালোবাসি।\n"
    "Emoji: 😀😃 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ — naïve café, Straße, ÅÄÖ, Ελληνικά, русский.\n"
    "def encode(self, text):\r\n\tif not text:\n        return []  # empty\n"
    "    return [ord(c) for c in text]\n\n\n   \n"
)


def assert_one_line(err):
    msg = str(err.value)
    assert msg and "\n" not in msg, f"not a one-line message: {msg!r}"
    return msg


def tiktoken_of(tok):
    """A tiktoken.Encoding built from tok's merges, pattern and special tokens (not its code)."""
    token_bytes = [bytes([b]) for b in range(256)]
    for a, b in tok.merges:
        token_bytes.append(token_bytes[a] + token_bytes[b])
    return tiktoken.Encoding(name="reference", pat_str=PATTERNS[tok.pattern],
                             mergeable_ranks={t: i for i, t in enumerate(token_bytes)},
                             special_tokens=tok.special_tokens)


def train_all(text, pattern="gpt4"):
    """The tokenizer with every merge the text allows: the size the unreachable-size error names."""
    with pytest.raises(ValueError) as err:
        BPETokenizer.train(text, 10**6, pattern=pattern, progress=False)
    reached = int(re.search(r"gives (\d+) tokens", assert_one_line(err)).group(1))
    return BPETokenizer.train(text, reached, pattern=pattern, progress=False)


@pytest.fixture(scope="module")
def shakespeare():
    return load_text()[:300_000]  # the default dataset (downloaded only if missing)


@pytest.fixture(scope="module")
def training_text(shakespeare):
    return shakespeare + MULTILINGUAL * 20


@pytest.fixture(scope="module", params=["gpt4", "gpt2"])
def tok(request, training_text):
    return BPETokenizer.train(training_text, 1024, pattern=request.param, special_tokens=SPECIALS,
                              progress=False)


@pytest.fixture(scope="module")
def ref(tok):
    return tiktoken_of(tok)


# ---------------------------------------------------------------- training
def test_first_merges_of_a_tiny_text_by_hand():
    # "aaabdaaabac" is one chunk. Pairs: aa 4, ab 2, the rest 1 -> aa = 256. Then
    # [aa a b d aa a b a c]: (256, a) 2 and (a, b) 2 tie, the smaller pair wins -> ab = 257.
    # Then [aa ab d aa ab a c]: (256, 257) 2 -> aaab = 258. Then all 1: smallest (a, c) -> 259.
    tok = BPETokenizer.train("aaabdaaabac", 260, progress=False)
    assert tok.merges == [(97, 97), (97, 98), (256, 257), (97, 99)]
    assert tok.vocab[256:] == [b"aa", b"ab", b"aaab", b"ac"]
    assert tok.encode("aaabdaaabac") == tok.encode_plain("aaabdaaabac") == [258, 100, 258, 259]
    assert tiktoken_of(tok).encode("aaabdaaabac") == [258, 100, 258, 259]
    # [aaab d aaab ac]: (100, 258) is the smallest of the pairs left, then (258, 260), (261, 259)
    assert train_all("aaabdaaabac").merges[4:] == [(100, 258), (258, 260), (261, 259)]


def test_training_twice_gives_the_same_merges(tok, training_text):
    again = BPETokenizer.train(training_text, 1024, pattern=tok.pattern, special_tokens=SPECIALS,
                               progress=False)
    assert again == tok and again.merges == tok.merges
    assert tok.vocab_size == len(tok) == 1024 and len(tok.merges) == 1024 - 256 - 2
    assert tok.special_tokens == {"<|endoftext|>": 1022, "<|pad|>": 1023}
    assert len(set(tok.vocab[:1022])) == 1022  # the tokens' bytes are unique


def test_merges_stay_inside_the_chunks_of_the_pattern():
    # GPT-4's pattern cuts digits into runs of at most three, GPT-2's keeps a run whole
    digits = "1234567890 " * 30
    assert max(len(t) for t in train_all(digits, "gpt4").vocab) == 3
    assert max(len(t) for t in train_all(digits, "gpt2").vocab) == len(" 1234567890")
    # a word takes the space before it, never the one after it
    words = train_all("the cat sat on the mat " * 10)
    assert b" the" in words.vocab and not any(t.endswith(b" ") for t in words.vocab[256:])


def test_the_patterns_are_tiktokens():
    assert PATTERNS["gpt2"] == openai_public.r50k_pat_str
    assert 'r"""' + PATTERNS["gpt4"] + '"""' in inspect.getsource(openai_public.cl100k_base)


def test_special_tokens_are_not_learned_from(capsys):
    text = "hello<|endoftext|>world<|endoftext|>" * 50
    # 8 merges make "hello" and "world" one token each; learned from the whole text, the
    # first would be "<|", the smallest of the equally frequent pairs
    tok = BPETokenizer.train(text, 265, special_tokens=["<|endoftext|>"])  # progress bar on
    assert capsys.readouterr().err == ""   # ... and quiet where stderr is not a terminal
    assert b"hello" in tok.vocab and b"world" in tok.vocab
    assert not any(b"<" in t or b"|" in t for t in tok.vocab[256:-1])
    assert tok.vocab[-1] == b"<|endoftext|>" and tok.special_tokens == {"<|endoftext|>": 264}
    assert tok.encode(text, allowed_special="all") == [262, 264, 263, 264] * 50


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text("ab \n", min_size=1, max_size=12), min_size=1, max_size=12))
def test_every_merge_the_error_promises_is_reachable_and_unique(words):
    text = " ".join(words)
    tok = train_all(text)
    assert len(set(tok.vocab)) == tok.vocab_size  # no two tokens with the same bytes
    assert tiktoken_of(tok).encode_ordinary(text) == tok.encode_plain(text)


# ---------------------------------------------------------------- tiktoken's encoding
def test_same_ids_as_tiktoken_on_the_training_text(tok, ref, shakespeare):
    for text in (shakespeare[:50_000], MULTILINGUAL, shakespeare[-20_000:] + MULTILINGUAL):
        expected = ref.encode_ordinary(text)
        assert tok.encode_plain(text) == expected
        assert tok.encode(text) == expected
        np.testing.assert_array_equal(tok.encode_array(text), expected)
        assert tok.encode_array(text).dtype == np.int64
    assert len(tok.encode(shakespeare[:50_000])) < 50_000 / 2  # merges shorten it


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_same_ids_as_tiktoken_on_any_text(tok, ref, s):
    expected = ref.encode(s, disallowed_special=())
    assert tok.encode_plain(s, disallowed_special=()) == expected
    assert tok.encode(s, disallowed_special=()) == expected


def words_of(text):
    """Strategy: texts glued from pieces of `text`, so the learned merges apply (and cross)."""
    pieces = sorted(set(text.split(" ")) | set(text.split("\n")) | set(MULTILINGUAL))
    return st.lists(st.sampled_from(pieces), max_size=40).map("".join)


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_same_ids_as_tiktoken_on_pieces_of_the_training_text(tok, ref, shakespeare, data):
    s = data.draw(words_of(shakespeare[:2000] + MULTILINGUAL))
    assert tok.encode_plain(s) == tok.encode(s) == ref.encode(s)
    assert tok.decode(tok.encode(s)) == s


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(SPECIALS), st.text(max_size=20)), max_size=8))
def test_same_ids_as_tiktoken_with_special_tokens(tok, ref, parts):
    s = "".join(parts)
    ids = ref.encode(s, allowed_special="all")
    assert tok.encode_plain(s, allowed_special="all") == tok.encode(s, allowed_special="all") == ids
    assert tok.decode(ids) == s
    only_pad = ref.encode(s, allowed_special={"<|pad|>"}, disallowed_special=())
    for encode in (tok.encode, tok.encode_plain):
        assert encode(s, allowed_special={"<|pad|>"}, disallowed_special=()) == only_pad
        assert encode(s, disallowed_special=()) == ref.encode_ordinary(s)


def test_special_tokens_in_the_text(tok):
    text = "To be<|endoftext|>or not<|pad|>"
    for encode in (tok.encode, tok.encode_plain):
        ids = encode(text, allowed_special="all")
        assert ids.count(1022) == 1 and ids.count(1023) == 1 and ids[-1] == 1023
        with pytest.raises(ValueError) as err:
            encode(text)  # tiktoken's default: special-token text is an error
        assert "'<|endoftext|>'" in assert_one_line(err) and "allowed_special" in str(err.value)
        with pytest.raises(ValueError) as err:
            encode(text, allowed_special={"<|endoftext|>"})
        assert "'<|pad|>'" in assert_one_line(err)
        plain = encode(text, disallowed_special=())  # as ordinary text
        assert 1022 not in plain and tok.decode(plain) == text
        with pytest.raises(ValueError) as err:
            encode(text, allowed_special={"<|nope|>"})
        assert "<|nope|>" in assert_one_line(err)
        with pytest.raises(ValueError) as err:
            encode(text, allowed_special="everything")
        assert_one_line(err)


def test_without_tiktoken_encode_runs_the_plain_path(tok, monkeypatch, shakespeare):
    monkeypatch.setitem(sys.modules, "tiktoken", None)  # import tiktoken raises ImportError
    fresh = BPETokenizer.from_json(tok.to_json())
    text = shakespeare[:5000] + MULTILINGUAL
    assert fresh.encode(text) == tok.encode_plain(text)
    assert fresh._tiktoken is False


# ---------------------------------------------------------------- round trips
@settings(max_examples=200, deadline=None)
@given(st.text())
def test_decode_encode_is_the_identity(tok, s):
    assert tok.decode(tok.encode(s, disallowed_special=())) == s
    assert tok.decode(tok.encode_plain(s, disallowed_special=())) == s


def as_tiktoken_reads(s):
    return s.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


@settings(max_examples=100, deadline=None)
@given(st.text(st.characters(codec=None, exclude_categories=())))  # lone surrogates too
def test_lone_surrogates_become_the_replacement_character(tok, ref, s):
    ids = ref.encode(s, disallowed_special=())
    assert tok.encode(s, disallowed_special=()) == tok.encode_plain(s, disallowed_special=()) == ids
    assert tok.decode(ids) == as_tiktoken_reads(s)


def test_lone_surrogates_by_example(tok):
    assert tok.decode(tok.encode("a\ud800b")) == "a\ufffdb"
    assert tok.decode(tok.encode_plain("\udcff")) == "\ufffd"
    assert tok.decode(tok.encode("\ud83d\ude00")) == "😀"  # a surrogate pair is its character
    assert BPETokenizer.train("ab\ud800ab" * 5, 257, progress=False).merges == [(97, 98)]


def test_decode(tok):
    assert tok.decode([]) == ""
    assert tok.decode(np.array([72, 105], dtype=np.uint8)) == "Hi"
    assert tok.decode([0xE4, 0xB8]) == "\ufffd"  # the start of 中 alone
    for bad in ([-1], [1024], [5, 2000]):
        with pytest.raises(ValueError) as err:
            tok.decode(bad)
        assert "[0, 1024)" in assert_one_line(err)
    with pytest.raises(ValueError) as err:
        tok.decode([[1, 2]])
    assert "1-D" in assert_one_line(err)


# ---------------------------------------------------------------- JSON
def test_json_round_trip(tok, tmp_path):
    obj = json.loads(tok.to_json())
    assert obj == {"type": "bpe", "pattern": tok.pattern,
                   "merges": [list(pair) for pair in tok.merges],
                   "special_tokens": {"<|endoftext|>": 1022, "<|pad|>": 1023}}
    again = BPETokenizer.from_json(tok.to_json())
    assert again == tok and again.vocab == tok.vocab and repr(again) == repr(tok)
    assert tokenizer_from_json(tok.to_json()) == tok
    path = tmp_path / "tok.json"
    tok.save(path)
    assert BPETokenizer.load(path) == tok
    assert BPETokenizer.load(path).encode(MULTILINGUAL) == tok.encode(MULTILINGUAL)
    assert tok != BPETokenizer(tok.merges[:-1], tok.pattern, SPECIALS)


def test_tokenizer_from_json_dispatches_on_the_type():
    char = CharTokenizer.from_text("hello")
    assert isinstance(tokenizer_from_json(char.to_json()), CharTokenizer)
    assert tokenizer_from_json(char.to_json()) == char
    bpe = BPETokenizer([(104, 101)], "gpt2", ["<|endoftext|>"])
    assert isinstance(tokenizer_from_json(bpe.to_json()), BPETokenizer)
    assert tokenizer_from_json(bpe.to_json()) == bpe and bpe.vocab_size == 258


@pytest.mark.parametrize("bad, needle", [
    ("{not json", "not a tokenizer JSON"),
    ('["a"]', '"char" or "bpe"'),
    ('{"type": "word"}', "got type 'word'"),
    ('{"type": "bpe", "merges": []}', "not a BPE tokenizer"),
    ('{"type": "bpe", "pattern": "gpt5", "merges": [], "special_tokens": {}}', "unknown pattern 'gpt5'"),
    ('{"type": "bpe", "pattern": "gpt4", "merges": [[256, 97]], "special_tokens": {}}', "merge 0"),
    ('{"type": "bpe", "pattern": "gpt4", "merges": [[97]], "special_tokens": {}}', "merge 0"),
    ('{"type": "bpe", "pattern": "gpt4", "merges": [[97, 98], [97, 98]], "special_tokens": {}}',
     "must be unique"),
    ('{"type": "bpe", "pattern": "gpt4", "merges": [], "special_tokens": {"<|e|>": 5}}', "256"),
    ('{"type": "bpe", "pattern": "gpt4", "merges": [], "special_tokens": {"": 256}}', "non-empty"),
    ('{"type": "char", "chars": ["b", "a"]}', "sorted"),
])
def test_bad_json_is_a_one_line_error(bad, needle):
    with pytest.raises(ValueError) as err:
        tokenizer_from_json(bad)
    assert needle in assert_one_line(err)
    if '"bpe"' in bad:
        with pytest.raises(ValueError):
            BPETokenizer.from_json(bad)


def test_a_checkpoint_holds_either_tokenizer(tok):
    assert load_tokenizer({"tokenizer": tok.to_json()}, "ckpt.npz") == tok
    char = CharTokenizer.from_text("To be")
    assert load_tokenizer({"tokenizer": char.to_json()}, "ckpt.npz") == char
    with pytest.raises(CheckpointError) as err:
        load_tokenizer({"tokenizer": '{"type": "bpe", "pattern": "gpt4"}'}, "ckpt.npz")
    assert "ckpt.npz" in assert_one_line(err) and "not a BPE tokenizer" in str(err.value)


# ---------------------------------------------------------------- errors
def test_a_vocabulary_the_text_cannot_reach_is_refused():
    with pytest.raises(ValueError) as err:
        BPETokenizer.train("aaabdaaabac", 300, progress=False)
    msg = assert_one_line(err)
    assert "vocab_size=300" in msg and "gives 263 tokens" in msg and "at most 263" in msg
    assert BPETokenizer.train("aaabdaaabac", 263, progress=False).vocab_size == 263


@pytest.mark.parametrize("kwargs, needle", [
    ({"vocab_size": 255}, "at least 256"),
    ({"vocab_size": 256.0}, "at least 256"),
    ({"vocab_size": 257, "special_tokens": SPECIALS}, "at least 256 (the bytes) + 2"),
    ({"vocab_size": 300, "special_tokens": ["<|a|>", "<|a|>"]}, "'<|a|>' more than once"),
    ({"vocab_size": 300, "special_tokens": [""]}, "non-empty"),
    ({"vocab_size": 300, "special_tokens": "<|a|>"}, "a list of strings"),
    ({"vocab_size": 300, "pattern": "cl100k"}, "unknown pattern 'cl100k'"),
])
def test_bad_training_arguments_are_refused(kwargs, needle):
    with pytest.raises(ValueError) as err:
        BPETokenizer.train("hello world", progress=False, **kwargs)
    assert needle in assert_one_line(err)


def test_the_rule_joins_bytes_by_rank_as_tiktoken_does():
    a, b, c, d, x = b"abcdx"
    # "bc" has the lowest rank, so "abcd" gets stuck at [a, bc, d]; a chunk that is a token
    # is that token all the same
    stuck = BPETokenizer([(b, c), (a, b), (c, d), (257, 258)])
    # "ab" then "c": their bytes are "abc", made from (a, "bc"), and they join
    by_bytes = BPETokenizer([(a, b), (b, c), (a, 257)])
    # two equal pairs overlap in "aaa": the leftmost joins first
    leftmost = BPETokenizer([(a, a)])
    for tok, text, ids in [(stuck, "abcd", [259]), (stuck, "abcdx", [a, 256, d, x]),
                           (by_bytes, "abcx", [258, x]), (leftmost, "aaa", [256, a])]:
        assert tok.encode_plain(text) == tok.encode(text) == tiktoken_of(tok).encode(text) == ids

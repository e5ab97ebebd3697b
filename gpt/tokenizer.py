"""The lecture's character-level tokenizer: one token per distinct character of the text.

    tok = CharTokenizer.from_text("hello world")
    tok.encode("hello")          # [3, 2, 4, 4, 5]
    tok.decode([3, 2, 4, 4, 5])  # 'hello'

The vocabulary is the sorted set of characters, so the same text always gives the same ids
(tiny Shakespeare: 65 characters, '\\n' is 0 and ' ' is 1). It is saved as JSON.
"""
import json
from pathlib import Path

import numpy as np


class CharTokenizer:
    """Maps each character of a fixed vocabulary to an integer id and back."""

    def __init__(self, chars):
        chars = list(chars)
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise ValueError(f"the vocabulary must hold single characters, got {bad[:5]!r}")
        if chars != sorted(set(chars)):
            raise ValueError("the vocabulary must be sorted and without repeats "
                             "(build it with CharTokenizer.from_text)")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}
        # code points, sorted like the characters: the lookup table of encode_array
        self._codes = np.array([ord(c) for c in chars], dtype=np.int64)

    @classmethod
    def from_text(cls, text):
        """The vocabulary of every character that occurs in text, sorted."""
        return cls(sorted(set(text)))

    @property
    def vocab_size(self):
        return len(self.chars)

    def __len__(self):
        return len(self.chars)

    def __repr__(self):
        return f"CharTokenizer(vocab_size={self.vocab_size})"

    def __eq__(self, other):
        return isinstance(other, CharTokenizer) and self.chars == other.chars

    # ----- encode / decode -------------------------------------------------------------
    def _unknown_error(self, text):
        unknown = list(dict.fromkeys(c for c in text if c not in self.stoi))  # first-seen order
        return ValueError("characters not in the vocabulary: " + ", ".join(repr(c) for c in unknown))

    def encode(self, text):
        """The ids of the characters of text, as a list of ints."""
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            raise self._unknown_error(text) from None

    def encode_array(self, text):
        """encode(), vectorised for long texts: an int64 array of the ids."""
        # the characters' code points, looked up in the sorted table of the vocabulary's
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        codes = codes.astype(np.int64)
        if codes.size == 0:
            return codes
        if self.vocab_size == 0:
            raise self._unknown_error(text)
        ids = np.searchsorted(self._codes, codes)        # where each code sits in the table
        if not np.array_equal(np.take(self._codes, ids, mode="clip"), codes):
            raise self._unknown_error(text)
        return ids

    def decode(self, ids):
        """The text of a sequence of ids (a list or a 1-D integer array)."""
        return "".join([self.chars[i] for i in _checked_ids(ids, self.vocab_size)])

    # ----- JSON ------------------------------------------------------------------------
    def to_json(self):
        return json.dumps({"type": "char", "chars": self.chars}, ensure_ascii=False)

    @classmethod
    def from_json(cls, s):
        obj = _parse_json(s)
        if not isinstance(obj, dict) or obj.get("type") != "char" or not isinstance(obj.get("chars"), list):
            raise ValueError('not a character tokenizer: expected {"type": "char", "chars": [...]}')
        return cls(obj["chars"])

    def save(self, path):
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path):
        return cls.from_json(_read_file(path))


# ----- shared by the tokenizers -------------------------------------------------------------
def _checked_ids(ids, vocab_size):
    """ids (a list or a 1-D integer array) as a list of ints; ValueError unless all are in range."""
    ids = np.asarray(ids)
    if ids.size == 0:
        return []
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise ValueError(f"decode needs a 1-D sequence of integer ids, got shape {ids.shape} "
                         f"and dtype {ids.dtype}")
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}), got min {ids.min()} "
                         f"and max {ids.max()}")
    return ids.tolist()


def _parse_json(s):
    try:
        return json.loads(s)
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"not a tokenizer JSON document: {e}") from None


def _read_file(path):
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the tokenizer file {path}: {e}") from None

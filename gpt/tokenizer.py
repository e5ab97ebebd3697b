"""Tokenizers: text to integer ids and back, saved as JSON.

CharTokenizer, the lecture's: one token per distinct character of the text.

    tok = CharTokenizer.from_text("hello world")
    tok.encode("hello")          # [3, 2, 4, 4, 5]
    tok.decode([3, 2, 4, 4, 5])  # 'hello'

The vocabulary is the sorted set of characters, so the same text always gives the same ids
(tiny Shakespeare: 65 characters, '\\n' is 0 and ' ' is 1).

BPETokenizer, byte-level byte-pair encoding as in GPT-2 and GPT-4: the 256 byte values of UTF-8
are the first tokens, and each merge learned from a training text adds one token for the most
frequent adjacent pair of tokens, until the vocabulary has the size asked for.

    tok = BPETokenizer.train(text, vocab_size=512)
    ids = tok.encode("To be, or not to be")  # fewer ids than characters
    tok.decode(ids)                          # 'To be, or not to be'

`tokenizer_from_json` reads either back from its JSON, {"type": "char", ...} or {"type": "bpe", ...}.
"""
import heapq
import json
import math
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import regex


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
        shown = ", ".join(repr(c) for c in unknown[:10]) + (", ..." if len(unknown) > 10 else "")
        return ValueError(f"{len(unknown)} distinct characters not in the vocabulary: {shown}")

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


# ----- byte-level BPE -----------------------------------------------------------------------

# The pre-split patterns, as tiktoken writes them (tiktoken_ext/openai_public.py). They cut a
# text into chunks: a word with its leading space or punctuation mark, up to three digits (GPT-4;
# GPT-2 takes any run), punctuation, whitespace. Merges never cross a chunk boundary, so " dog"
# in " dog." and " dog," is the same token and no token glues a word to the next.
PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s""",
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
            r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""",
}


class BPETokenizer:
    """Byte-level byte-pair encoding: ids 0..255 are the byte values of UTF-8, id 256 + i is
    made by merges[i] = (a, b) and has the bytes of token a followed by those of token b, and the
    special tokens (such as "<|endoftext|>") take the ids after the merges.

    Encoding follows tiktoken's rule, so a tiktoken.Encoding built from the same merges, pattern
    and special tokens gives the same ids. The pattern cuts the text into chunks; each chunk
    starts as its bytes, and again and again the two neighbours whose joined bytes are the token
    of lowest id are joined (the leftmost pair, if there are two), until no neighbours make a
    token. A chunk whose bytes are a token is that token at once. Unlike replaying the merges in
    order (minbpe's encode), neighbours join whenever their bytes make a token, whichever pair
    made it.

    The rule finds tokens by their bytes, so no two tokens may have the same bytes; the
    constructor refuses merges that give two tokens the same bytes. Training never makes one:
    for neighbours x, y whose bytes are those of an older token z = (u, v), the text under x y
    was cut into u, v when z was made (a stretch of text whose ends stay token boundaries is cut
    as it would be on its own) and so became z. Should such a pair come up all the same,
    training skips it rather than add a second token with z's bytes.

    A Python str may hold lone surrogates ("\\ud800"), which UTF-8 cannot encode: encode
    replaces each with U+FFFD, as tiktoken does (and a surrogate pair written as two code units
    becomes its character), so decode(encode(s)) == s for every str without them.
    """

    def __init__(self, merges, pattern="gpt4", special_tokens=()):
        if pattern not in PATTERNS:
            raise ValueError(f"unknown pattern {pattern!r}: use one of {sorted(PATTERNS)}")
        self.pattern = pattern
        self._regex = regex.compile(PATTERNS[pattern])
        self.vocab = [bytes([b]) for b in range(256)]  # the bytes of every token, by id
        self.merges = []
        for i, pair in enumerate(merges):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2
                    and all(_is_int(t) and 0 <= t < len(self.vocab) for t in pair)):
                raise ValueError(f"merge {i} should be a pair of ids below {len(self.vocab)}, "
                                 f"got {pair!r}")
            a, b = int(pair[0]), int(pair[1])
            self.merges.append((a, b))
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self._ranks = {token: i for i, token in enumerate(self.vocab)}  # bytes -> id
        if len(self._ranks) != len(self.vocab):
            i = next(i for i, token in enumerate(self.vocab) if self._ranks[token] != i)
            raise ValueError(f"token {i} (merge {i - 256}) has the bytes {self.vocab[i]!r} of token "
                             f"{self.vocab.index(self.vocab[i])}: the tokens' bytes must be unique")
        special_tokens = _special_token_list(special_tokens)
        self.special_tokens = {s: len(self.vocab) + i for i, s in enumerate(special_tokens)}
        self.vocab += [s.encode("utf-8") for s in special_tokens]
        self._cache = {}         # chunk -> its ids, filled by encode_plain
        self._tiktoken = None    # the tiktoken.Encoding of encode, or False without tiktoken

    @classmethod
    def train(cls, text, vocab_size, pattern="gpt4", special_tokens=(), progress=True):
        """Learn merges from text until the vocabulary (256 bytes, the merges, the special
        tokens) has vocab_size tokens.

        The text is cut into chunks by the pattern (and at the special tokens, whose text is not
        learned from), so pairs are counted and merged only inside a chunk. Each step merges the
        most frequent pair everywhere (of equally frequent pairs, the smallest (a, b)).
        """
        from tqdm import tqdm

        special_tokens = _special_token_list(special_tokens)
        if not _is_int(vocab_size) or vocab_size < 256 + len(special_tokens):
            raise ValueError(f"vocab_size must be an integer of at least 256 (the bytes) + "
                             f"{len(special_tokens)} (the special tokens), got {vocab_size!r}")
        tok = cls([], pattern, special_tokens)   # checks the pattern and the special tokens
        n_merges = vocab_size - 256 - len(special_tokens)
        # each distinct chunk once, with how often it occurs
        pieces = tok._split_at_specials(_replace_lone_surrogates(text), set(special_tokens))
        chunks = Counter(chunk.encode("utf-8") for piece in pieces[::2]
                         for chunk in tok._regex.findall(piece))
        with tqdm(total=n_merges, desc="BPE merges", unit="merge",
                  disable=None if progress else True) as bar:  # None: quiet unless a terminal
            merges = _learn_merges(chunks, n_merges, bar.update)
        if len(merges) < n_merges:
            reached = 256 + len(merges) + len(special_tokens)
            raise ValueError(f"the text has too few distinct pairs for vocab_size={vocab_size}: "
                             f"merging all of them gives {reached} tokens; train on more text or "
                             f"ask for at most {reached}")
        return cls(merges, pattern, special_tokens)

    @property
    def vocab_size(self):
        return len(self.vocab)

    def __len__(self):
        return len(self.vocab)

    def __repr__(self):
        return (f"BPETokenizer(vocab_size={self.vocab_size}, pattern={self.pattern!r}, "
                f"special_tokens={list(self.special_tokens)})")

    def __eq__(self, other):
        return (isinstance(other, BPETokenizer) and self.pattern == other.pattern
                and self.merges == other.merges and self.special_tokens == other.special_tokens)

    # ----- encode / decode -------------------------------------------------------------
    def encode(self, text, allowed_special=(), disallowed_special="all"):
        """The ids of text, as a list of ints.

        Special tokens as in tiktoken: the text of one in allowed_special (a set of them, or
        "all") becomes its id; the text of one in disallowed_special (by default every one not
        allowed) is an error, and with disallowed_special=() it is encoded as ordinary text.
        Runs through tiktoken when it is installed (the same ids; faster on a text whose chunks
        encode_plain has not cached yet), else through encode_plain.
        """
        fast = self._tiktoken_encoding()
        if fast is None:
            return self.encode_plain(text, allowed_special, disallowed_special)
        text = _replace_lone_surrogates(text)
        allowed = self._allowed_specials(text, allowed_special, disallowed_special)
        return fast.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_plain(self, text, allowed_special=(), disallowed_special="all"):
        """encode() in plain Python: the reference that the tiktoken path is tested against."""
        text = _replace_lone_surrogates(text)
        allowed = self._allowed_specials(text, allowed_special, disallowed_special)
        pieces = self._split_at_specials(text, allowed)  # ordinary text, special, ordinary, ...
        ids = []
        for i, piece in enumerate(pieces):
            if i % 2 == 1:
                ids.append(self.special_tokens[piece])
                continue
            for chunk in self._regex.findall(piece):
                chunk_ids = self._cache.get(chunk)
                if chunk_ids is None:
                    if len(self._cache) >= 1 << 16:  # bounded: a long text has many rare chunks
                        self._cache.clear()
                    chunk_ids = self._cache[chunk] = self._encode_chunk(chunk.encode("utf-8"))
                ids.extend(chunk_ids)
        return ids

    def encode_array(self, text, allowed_special=(), disallowed_special="all"):
        """encode() as an int64 array, the form gpt/data.py stores."""
        return np.array(self.encode(text, allowed_special, disallowed_special), dtype=np.int64)

    def _encode_chunk(self, chunk):
        """The ids of one chunk (bytes) by tiktoken's rule (see the class docstring)."""
        if chunk in self._ranks:
            return [self._ranks[chunk]]
        parts = [bytes([b]) for b in chunk]
        while len(parts) > 1:
            # the id of the token each adjacent pair would make (inf: none)
            ranks = [self._ranks.get(a + b, math.inf) for a, b in zip(parts, parts[1:])]
            i = min(range(len(ranks)), key=ranks.__getitem__)  # the lowest, leftmost first
            if ranks[i] == math.inf:
                break
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        return [self._ranks[part] for part in parts]

    def _allowed_specials(self, text, allowed_special, disallowed_special):
        """The set of special tokens to encode as such; ValueError if text holds a disallowed one."""
        names = set(self.special_tokens)
        for arg, value in [("allowed_special", allowed_special),
                           ("disallowed_special", disallowed_special)]:
            if value != "all" and (isinstance(value, str) or not set(value) <= names):
                raise ValueError(f"{arg} should be 'all' or a set of this tokenizer's special "
                                 f"tokens {sorted(names)}, got {value!r}")
        allowed = names if allowed_special == "all" else set(allowed_special)
        disallowed = names - allowed if disallowed_special == "all" else set(disallowed_special)
        if disallowed and (found := _special_regex(disallowed).search(text)):
            raise ValueError(f"the text holds the special token {found.group()!r}: pass "
                             f"allowed_special={{{found.group()!r}}} (or 'all') to encode it as that "
                             f"token, or disallowed_special=() to encode it as ordinary text")
        return allowed

    def _split_at_specials(self, text, specials):
        """[text, special, text, special, ..., text]: text cut at each occurrence of specials."""
        return _special_regex(specials).split(text) if specials else [text]

    def _tiktoken_encoding(self):
        """A tiktoken.Encoding of these merges, pattern and special tokens (built on first use,
        with no download), or None where tiktoken is not installed."""
        if self._tiktoken is None:
            try:
                import tiktoken
            except ImportError:
                self._tiktoken = False
            else:
                self._tiktoken = tiktoken.Encoding(
                    name=f"tinytensor-bpe-{self.vocab_size}", pat_str=PATTERNS[self.pattern],
                    mergeable_ranks=self._ranks, special_tokens=self.special_tokens)
        return self._tiktoken or None

    def decode(self, ids):
        """The text of a sequence of ids (a list or a 1-D integer array). Ids that end inside a
        character (a prefix of its UTF-8 bytes) give U+FFFD for those bytes."""
        data = b"".join([self.vocab[i] for i in _checked_ids(ids, self.vocab_size)])
        return data.decode("utf-8", errors="replace")

    # ----- JSON ------------------------------------------------------------------------
    def to_json(self):
        return json.dumps({"type": "bpe", "pattern": self.pattern,
                           "merges": [list(pair) for pair in self.merges],
                           "special_tokens": self.special_tokens}, ensure_ascii=False)

    @classmethod
    def from_json(cls, s):
        obj = _parse_json(s)
        if not (isinstance(obj, dict) and obj.get("type") == "bpe" and isinstance(obj.get("pattern"), str)
                and isinstance(obj.get("merges"), list) and isinstance(obj.get("special_tokens"), dict)):
            raise ValueError('not a BPE tokenizer: expected {"type": "bpe", "pattern": "gpt4", '
                             '"merges": [[a, b], ...], "special_tokens": {"<|endoftext|>": id, ...}}')
        specials = obj["special_tokens"]
        first = 256 + len(obj["merges"])
        ids = list(specials.values())
        if not all(_is_int(i) for i in ids) or sorted(ids) != list(range(first, first + len(ids))):
            raise ValueError(f"the special tokens' ids should be {first}, {first + 1}, ... (after the "
                             f"merges), got {ids}")
        return cls(obj["merges"], obj["pattern"], sorted(specials, key=specials.get))

    def save(self, path):
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path):
        return cls.from_json(_read_file(path))


def _learn_merges(chunks, n_merges, step_done):
    """The first n_merges merges of BPE over chunks ({bytes: how often it occurs}), fewer when
    the pairs run out; step_done() is called after each merge.

    Pairs are counted over the distinct chunks, each weighted by how often it occurs. After a
    merge only the chunks that hold the merged pair are counted again: `where` keeps, for every
    pair, the chunks it occurs in. The counts sit in a heap of (-count, pair), so the most
    frequent pair (the smallest of equally frequent ones) is on top; an entry whose count is no
    longer the pair's count is stale and skipped.
    """
    words = [list(chunk) for chunk in chunks]  # each distinct chunk as a list of token ids
    weights = list(chunks.values())
    counts = Counter()                          # pair -> how often it occurs in the text
    where = defaultdict(set)                    # pair -> the indices of the words it occurs in
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            counts[pair] += weights[i]
            where[pair].add(i)
    heap = [(-count, pair) for pair, count in counts.items()]
    heapq.heapify(heap)
    vocab = [bytes([b]) for b in range(256)]
    seen = set(vocab)                           # the bytes of every token so far
    merges = []
    while heap and len(merges) < n_merges:
        count, pair = heapq.heappop(heap)
        joined = vocab[pair[0]] + vocab[pair[1]]
        if -count != counts[pair] or joined in seen:  # stale, or the bytes of a token we have
            continue
        new_id = len(vocab)
        merges.append(pair)
        vocab.append(joined)
        seen.add(joined)
        changed = set()
        for i in where.pop(pair):
            word, weight = words[i], weights[i]
            for p in zip(word, word[1:]):
                counts[p] -= weight
                changed.add(p)
            words[i] = word = _merge(word, pair, new_id)
            for p in zip(word, word[1:]):
                counts[p] += weight
                changed.add(p)
                where[p].add(i)
        for p in changed:
            if counts[p] > 0:
                heapq.heappush(heap, (-counts[p], p))
        step_done()
    return merges


def _merge(ids, pair, new_id):
    """ids with each occurrence of pair, from left to right, replaced by new_id."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _replace_lone_surrogates(text):
    """text with each lone surrogate replaced by U+FFFD (and a surrogate pair by its character),
    as tiktoken does: read as UTF-16 with errors="replace"."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _special_regex(specials):
    """A regex matching any of specials, the longest first; a group, so that split keeps them."""
    longest_first = sorted(specials, key=lambda s: (-len(s), s))
    return regex.compile("(" + "|".join(regex.escape(s) for s in longest_first) + ")")


def _special_token_list(specials):
    """specials as a list; ValueError unless they are distinct, non-empty strings."""
    if isinstance(specials, str):
        raise ValueError(f"special_tokens should be a list of strings, got the string {specials!r}")
    specials = list(specials)
    for s in specials:
        if not isinstance(s, str) or not s or _replace_lone_surrogates(s) != s:
            raise ValueError(f"a special token must be a non-empty string of valid characters, "
                             f"got {s!r}")
    repeated = sorted({s for s in specials if specials.count(s) > 1})
    if repeated:
        raise ValueError(f"special tokens must be distinct, got {repeated[0]!r} more than once")
    return specials


def _is_int(x):
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def tokenizer_from_json(s):
    """The CharTokenizer or BPETokenizer that to_json() wrote, chosen by its "type"."""
    obj = _parse_json(s)
    kind = obj.get("type") if isinstance(obj, dict) else None
    classes = {"char": CharTokenizer, "bpe": BPETokenizer}
    if kind not in classes:
        raise ValueError(f'not a tokenizer: expected an object whose "type" is "char" or "bpe", '
                         f'got type {kind!r}')
    return classes[kind].from_json(s)

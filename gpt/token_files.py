"""Token files: a text tokenized once, streaming, into train.bin and val.bin, read with np.memmap.

    folder = build_token_files("my_text.txt", "out/tokens", TokenizerSpec("char"))  # once
    ds = TokenDataset("out/tokens")           # later runs, and every MPI rank, open it
    x, y = ds.get_batch("train", 4, 8, np.random.default_rng(0))

The lecture keeps the whole text in memory as one string and one array of ids; that stops at a
few hundred MB. Here the text is read in blocks of BLOCK_BYTES (bounded memory whatever its
size, a progress bar), as nanoGPT's prepare.py and llm.c do:

1. the vocabulary: the character tokenizer's comes from a first pass (which characters occur,
   counted per block); a BPE tokenizer is learned from the first BPE_SAMPLE_BYTES of the text;
   a tokenizer given (from a checkpoint) is used as it is;
2. the ids of each block go to a file as uint16 (uint32 when the vocabulary needs it); the last
   10% of the tokens are then moved to val.bin: the 90/10 split is by token position, as
   CharDataset's is, so the character path draws the same batches as before;
3. manifest.json, written last (atomically, as every file here), describes the source (path,
   size, mtime, sha256), the tokenizer, the dtype and each file's token count and sha256.

A later run reuses the files when the manifest matches the source and the tokenizer it wants,
and rebuilds them, saying why, when anything differs or does not check out: a manifest that is
not JSON, a file of the wrong size or checksum. Nothing in them is trusted unchecked, and
nothing in them can run code (JSON and raw integers).
"""
import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import DataError, Splits
from .tokenizer import BPETokenizer, CharTokenizer, tokenizer_from_json

BLOCK_BYTES = 1 << 24          # 16 MB of the text at a time
BPE_SAMPLE_BYTES = 4 << 20     # a BPE tokenizer learns its merges from the first 4 MB
BPE_PATTERN = "gpt4"           # its pre-split: GPT-4's regex (gpt.tokenizer.PATTERNS)
FORMAT, VERSION = "tinytensor-gpt tokens", 1
VAL_FRACTION = 0.1


@dataclass(frozen=True)
class TokenizerSpec:
    """The tokenizer a run wants: `tokenizer` (an object: a checkpoint's) or one to build from
    the text: kind "char", or "bpe" with vocab_size."""
    kind: str = "char"
    vocab_size: int = 0
    tokenizer: object = None

    def matches(self, tokenizer):
        if self.tokenizer is not None:
            return tokenizer == self.tokenizer
        if self.kind == "char":
            return isinstance(tokenizer, CharTokenizer)
        return (isinstance(tokenizer, BPETokenizer) and tokenizer.vocab_size == self.vocab_size
                and tokenizer.pattern == BPE_PATTERN and not tokenizer.special_tokens)

    def describe(self):
        if self.tokenizer is not None:
            return f"the given {self.tokenizer!r}"
        return "characters" if self.kind == "char" else f"BPE with {self.vocab_size} tokens"


# ---------------------------------------------------------------- reading the text in blocks
_CUT = re.compile(r"\n(?=\S)")  # a cut after a newline that starts a word never splits a chunk


def read_blocks(path, block_bytes=BLOCK_BYTES, progress=None):
    """Yield the text of a UTF-8 file in blocks of about block_bytes, each ending after a newline
    followed by a non-space (so a BPE pre-split never straddles two blocks) where there is one.
    Bytes that are not UTF-8 raise DataError with the file and the byte offset."""
    pending, carry, offset = b"", "", 0
    with open(path, "rb") as f:
        while True:
            raw = f.read(block_bytes)
            final = not raw
            buf = pending + raw
            try:
                text, pending = buf.decode("utf-8"), b""
            except UnicodeDecodeError as e:
                if final or e.end < len(buf) or e.start < len(buf) - 3:  # not a split character
                    raise DataError(f"data file is not UTF-8 text: {path} (byte {offset + e.start} "
                                    f"is {buf[e.start]:#04x}); convert it to UTF-8") from None
                text, pending = buf[:e.start].decode("utf-8"), buf[e.start:]
            offset += len(buf) - len(pending)
            if progress is not None:
                progress(len(raw))
            text = carry + text
            if final:
                if text:
                    yield text
                return
            cut = None
            for m in _CUT.finditer(text, max(0, len(text) - 65536)):  # the last such newline
                cut = m.end()
            if cut is None and len(text) > 4 * block_bytes:  # one huge line: cut anyway
                cut = len(text)
            carry, text = (text[cut:], text[:cut]) if cut is not None else (text, "")
            if text:
                yield text


def file_sha256(path, block_bytes=BLOCK_BYTES):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def source_info(path):
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


# ---------------------------------------------------------------- building
def _bar(total, desc, main):
    from tqdm import tqdm
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None if main else True)


def char_vocabulary(path, main=True):
    """The CharTokenizer of every character in the file, from one streaming pass."""
    seen = np.zeros(0x110000, dtype=bool)
    with _bar(os.path.getsize(path), "vocabulary", main) as bar:
        for text in read_blocks(path, progress=bar.update):
            codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
            seen |= np.bincount(codes, minlength=seen.size).astype(bool)
    return CharTokenizer([chr(c) for c in np.flatnonzero(seen)])


def learn_bpe(path, vocab_size, main=True):
    """A BPETokenizer learned from the first BPE_SAMPLE_BYTES of the file."""
    sample = []
    size = 0
    for text in read_blocks(path, block_bytes=min(BLOCK_BYTES, BPE_SAMPLE_BYTES)):
        sample.append(text)
        size += len(text)
        if size >= BPE_SAMPLE_BYTES:
            break
    try:
        return BPETokenizer.train("".join(sample), vocab_size, pattern=BPE_PATTERN, progress=main)
    except ValueError as e:
        raise DataError(f"{path}: {e}") from None


def make_tokenizer(path, spec, main=True):
    if spec.tokenizer is not None:
        return spec.tokenizer
    if spec.kind == "char":
        return char_vocabulary(path, main)
    return learn_bpe(path, spec.vocab_size, main)


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def _atomic(folder, name, write):
    """write(f) into a temporary file in folder, fsync, then rename it to name."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    _usual_permissions(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(folder, name))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


_TEMP = re.compile(r"^\.(tokens|train\.bin|val\.bin|manifest\.json)\.[A-Za-z0-9_]+\.tmp$")


def _usual_permissions(path):
    """mkstemp makes 0600 files; give the permissions the umask would give a new file."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def encode_file(path, tokenizer, folder, main=True):
    """Tokenize the file into folder/train.bin and folder/val.bin; returns the manifest's
    entries for them ({"train": {...}, "val": {...}}, "dtype")."""
    dtype = token_dtype(tokenizer.vocab_size)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tokens.", suffix=".tmp")
    _usual_permissions(tmp)
    try:
        total = 0
        with os.fdopen(fd, "wb") as f, _bar(os.path.getsize(path), "tokenizing", main) as bar:
            for text in read_blocks(path, progress=bar.update):
                try:
                    ids = tokenizer.encode_array(text)
                except ValueError as e:  # characters outside a given vocabulary
                    raise DataError(str(e)) from None
                f.write(ids.astype(dtype).tobytes())
                total += len(ids)
        if total == 0:
            raise DataError(f"data file is empty: {path}")
        n = int((1 - VAL_FRACTION) * total)  # the first 90% trains, the rest validates
        itemsize = np.dtype(dtype).itemsize

        def copy_tail(out):  # val.bin: the tokens after the first n, copied block by block
            with open(tmp, "rb") as src:
                src.seek(n * itemsize)
                while chunk := src.read(BLOCK_BYTES):
                    out.write(chunk)
        _atomic(folder, "val.bin", copy_tail)
        with open(tmp, "r+b") as f:  # train.bin: the file itself, cut to its first n tokens
            f.truncate(n * itemsize)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(folder, "train.bin"))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"dtype": np.dtype(dtype).name,
            "train": {"file": "train.bin", "tokens": n,
                      "sha256": file_sha256(os.path.join(folder, "train.bin"))},
            "val": {"file": "val.bin", "tokens": total - n,
                    "sha256": file_sha256(os.path.join(folder, "val.bin"))}}


def build_token_files(path, folder, spec, main=True, say=print):
    """Make sure folder holds the token files of the text at path for the tokenizer spec asks
    for: reuse them when the manifest checks out, else (re)build them, saying why. Returns the
    folder. Call it on one process (rank 0), then open TokenDataset(folder) everywhere."""
    os.makedirs(folder, exist_ok=True)
    for name in os.listdir(folder):  # what a killed build left (the caller holds out_dir's lock)
        if _TEMP.match(name):
            os.remove(os.path.join(folder, name))
    why = stale(path, folder, spec)
    if why is None:
        return folder
    if why != "none yet":
        say(f"tokens: rebuilding {folder} ({why})")
    start = time.perf_counter()
    sha = file_sha256(path)
    tokenizer = make_tokenizer(path, spec, main)
    files = encode_file(path, tokenizer, folder, main)
    manifest = {"format": FORMAT, "version": VERSION,
                "source": dict(source_info(path), sha256=sha),
                "tokenizer": json.loads(tokenizer.to_json()), **files}
    _atomic(folder, "manifest.json",
            lambda f: f.write(json.dumps(manifest, ensure_ascii=False, indent=1).encode("utf-8")))
    seconds = time.perf_counter() - start
    mb = manifest["source"]["size"] / 1e6
    say(f"tokens: {path} ({mb:,.1f} MB) -> {files['train']['tokens'] + files['val']['tokens']:,} "
        f"tokens in {folder} in {seconds:.1f} s ({mb / max(seconds, 1e-9):,.1f} MB/s)")
    return folder


def read_manifest(folder):
    """The manifest of folder, its every field checked; DataError when it is missing or bad."""
    path = os.path.join(folder, "manifest.json")
    try:
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except FileNotFoundError:
        raise DataError(f"no token files in {folder} (no manifest.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is unreadable ({e})") from None
    try:
        assert m["format"] == FORMAT and m["version"] == VERSION
        assert m["dtype"] in ("uint16", "uint32")
        assert all(isinstance(m["source"][k], int) for k in ("size", "mtime_ns"))
        assert isinstance(m["source"]["sha256"], str) and isinstance(m["source"]["path"], str)
        for split in ("train", "val"):
            assert m[split]["file"] == f"{split}.bin"
            assert isinstance(m[split]["tokens"], int) and m[split]["tokens"] >= 0
            assert isinstance(m[split]["sha256"], str)
        assert isinstance(m["tokenizer"], dict)
    except (AssertionError, KeyError, TypeError):
        raise DataError(f"{path} is not a token-file manifest of this version") from None
    return m


def load_manifest_tokenizer(m, folder):
    try:
        return tokenizer_from_json(json.dumps(m["tokenizer"]))
    except ValueError as e:
        raise DataError(f"{folder}/manifest.json: unusable tokenizer ({e})") from None


def stale(path, folder, spec):
    """Why folder's token files cannot serve the text at path with the tokenizer of spec, or
    None when they can (the manifest, the source and both files checked)."""
    try:
        m = read_manifest(folder)
    except DataError as e:
        return "none yet" if "no manifest.json" in str(e) else str(e)
    src, info = m["source"], source_info(path)
    if src["path"] != info["path"]:
        return f"they were made from {src['path']}"
    if (src["size"], src["mtime_ns"]) != (info["size"], info["mtime_ns"]) \
            and (src["size"] != info["size"] or file_sha256(path) != src["sha256"]):
        return "the text changed"
    try:
        tokenizer = load_manifest_tokenizer(m, folder)
    except DataError as e:
        return str(e)
    if not spec.matches(tokenizer):
        return f"they hold another tokenizer than {spec.describe()}"
    itemsize = np.dtype(m["dtype"]).itemsize
    if m["dtype"] != np.dtype(token_dtype(tokenizer.vocab_size)).name:
        return "the dtype does not fit the vocabulary"
    for split in ("train", "val"):
        f = os.path.join(folder, m[split]["file"])
        if not os.path.isfile(f) or os.path.getsize(f) != m[split]["tokens"] * itemsize:
            return f"{f} is missing or of the wrong size"
        if file_sha256(f) != m[split]["sha256"]:
            return f"{f} does not match its checksum"
    return None


# ---------------------------------------------------------------- reading batches
class TokenDataset(Splits):
    """The token files of a folder (build_token_files), read through np.memmap: CharDataset's
    interface (data.Splits: tokenizer, train, val, split, check_block_size, get_batch), with
    the text never in memory. `source` is the manifest's description of the text (its sha256
    included: the data's fingerprint)."""

    def __init__(self, folder):
        m = read_manifest(folder)
        self.folder, self.source = folder, m["source"]
        self.tokenizer = load_manifest_tokenizer(m, folder)
        dtype = np.dtype(m["dtype"])
        splits = {}
        for split in ("train", "val"):
            n = m[split]["tokens"]
            f = os.path.join(folder, m[split]["file"])
            if not os.path.isfile(f) or os.path.getsize(f) != n * dtype.itemsize:
                raise DataError(f"{f} is missing or of the wrong size: delete {folder} to rebuild it")
            splits[split] = (np.memmap(f, dtype=dtype, mode="r", shape=(n,)) if n
                             else np.zeros(0, dtype=dtype))
        self.train, self.val = splits["train"], splits["val"]

    def fingerprint(self):
        """What identifies the data: the text's sha256, the tokenizer and the token counts."""
        return {"text sha256": self.source["sha256"], "tokens": [len(self.train), len(self.val)],
                "tokenizer": self.tokenizer.to_json()}

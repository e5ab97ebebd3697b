"""The data pipeline of the lecture: read a text, encode it, split 90/10, draw batches.

    text = load_text()                     # tiny Shakespeare (downloaded on first use)
    ds = CharDataset(text)                 # tokenizer from the text, train/val split
    x, y = ds.get_batch("train", batch_size=4, block_size=8, rng=np.random.default_rng(0))

x and y are int64 arrays (B, T): y[b, t] is the token that follows x[b, :t+1], the lecture's
"for each position, the context is everything up to it and the target is the next token".

Every problem with the data (missing, empty, not UTF-8, too short, offline download) raises
DataError, whose message is one line saying what is wrong and how to fix it.
"""
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from .tokenizer import CharTokenizer

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_PATH = PROJECT_ROOT / "data" / "tinyshakespeare" / "input.txt"
DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


class DataError(ValueError):
    """A problem with the data, explained in one line."""


# ---------------------------------------------------------------- reading and downloading
def download(url, path, sha256, timeout=60):
    """Download url to path with a progress bar, check its sha256, then move it into place.

    The file is written to a temporary name beside path and renamed only after the check, so
    an interrupted or corrupt download never leaves a partial file at path.
    """
    from tqdm import tqdm

    path = Path(path)
    place_hint = f"download {url} yourself and place it at {path}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the folder {path.parent} ({e}); {place_hint}") from None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".part")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as response:
                    total = response.headers.get("Content-Length") if response.headers else None
                    with tqdm(total=int(total) if total else None, unit="B", unit_scale=True,
                              desc=f"downloading {path.name}", disable=None) as bar:
                        while chunk := response.read(1 << 16):
                            f.write(chunk)
                            digest.update(chunk)
                            bar.update(len(chunk))
            except (urllib.error.URLError, OSError, ValueError) as e:
                reason = " ".join(str(getattr(e, "reason", None) or e).split())  # one line
                raise DataError(f"could not download {url} ({reason}); {place_hint}") from None
            f.flush()
            os.fsync(f.fileno())
        if digest.hexdigest() != sha256:
            raise DataError(f"the file downloaded from {url} has sha256 {digest.hexdigest()}, "
                            f"expected {sha256}; {place_hint}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def data_path(path=None):
    """The path of a data file: path itself (checked: it exists and is a file), or with None
    tiny Shakespeare at DEFAULT_DATA_PATH, downloaded from DATA_URL when missing."""
    if path is None:
        path = DEFAULT_DATA_PATH
        if not path.exists():
            download(DATA_URL, path, DATA_SHA256)
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():
        raise DataError(f"data path is not a file: {path}")
    if path.stat().st_size == 0:
        raise DataError(f"data file is empty: {path}")
    return path


def load_text(path=None):
    """The text of a UTF-8 file; path None means tiny Shakespeare at DEFAULT_DATA_PATH.

    The default dataset is downloaded from DATA_URL when it is missing (and checked against
    DATA_SHA256). An explicit path is read as it is: it must exist, be UTF-8 and not be empty.
    """
    path = data_path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read the data file {path}: {e.strerror or e}") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file is not UTF-8 text: {path} (byte {e.start} is {raw[e.start]:#04x}); "
                        f"convert it to UTF-8") from None


# ---------------------------------------------------------------- batches
def get_batch(data, batch_size, block_size, rng):
    """batch_size random chunks of data: x (B, T) and y (B, T), y being x shifted by one.

    As in the lecture: ix = randint(len(data) - block_size) for each row, x = data[i:i+T],
    y = data[i+1:i+T+1]. rng is a numpy Generator, so a seed fixes the batches.
    """
    if block_size < 1 or batch_size < 1:
        raise ValueError(f"batch_size and block_size must be positive, got {batch_size} and {block_size}")
    if len(data) < block_size + 1:
        raise DataError(f"the data has {len(data)} tokens but block_size {block_size} needs at "
                        f"least {block_size + 1}: use a longer text or a smaller block_size")
    ix = rng.integers(0, len(data) - block_size, size=batch_size)  # (B,) chunk starts
    rows = ix[:, None] + np.arange(block_size + 1)                  # (B, T+1) positions
    chunk = data[rows].astype(np.int64)                             # (B, T+1) tokens
    return np.ascontiguousarray(chunk[:, :-1]), np.ascontiguousarray(chunk[:, 1:])


class Splits:
    """What a dataset with a tokenizer and `train` / `val` token arrays offers the training
    loop: vocab_size, split(name), check_block_size and get_batch (CharDataset in memory,
    token_files.TokenDataset on disk)."""

    def __len__(self):
        return len(self.train) + len(self.val)

    @property
    def vocab_size(self):
        return self.tokenizer.vocab_size

    def split(self, name):
        if name == "train":
            return self.train
        if name == "val":
            return self.val
        raise ValueError(f"split must be 'train' or 'val', got {name!r}")

    def check_block_size(self, block_size):
        """Raise DataError unless both splits hold at least block_size + 1 tokens."""
        for name in ("train", "val"):
            n = len(self.split(name))
            if n < block_size + 1:
                raise DataError(f"the text is too short for block_size {block_size}: its {name} "
                                f"split has {n} tokens (of {len(self):,} in all) and needs at "
                                f"least {block_size + 1}; use a longer text or a smaller block_size")

    def get_batch(self, split, batch_size, block_size, rng):
        """x, y int64 (batch_size, block_size) from the 'train' or 'val' split (see get_batch)."""
        data = self.split(split)
        if len(data) < block_size + 1:
            self.check_block_size(block_size)
        return get_batch(data, batch_size, block_size, rng)


class CharDataset(Splits):
    """A text encoded character by character, split 90/10 into train and val.

    `data` holds the whole text as compact integers (uint8 for up to 256 characters);
    `train` and `val` are views of it.
    """

    def __init__(self, text, tokenizer=None):
        if not text:
            raise DataError("the text is empty: there is nothing to train on")
        self.tokenizer = tokenizer if tokenizer is not None else CharTokenizer.from_text(text)
        vocab = self.tokenizer.vocab_size
        dtype = np.uint8 if vocab <= 256 else np.uint16 if vocab <= 65536 else np.int32
        try:
            self.data = self.tokenizer.encode_array(text).astype(dtype)
        except ValueError as e:  # a tokenizer from elsewhere (a checkpoint) that lacks characters
            raise DataError(f"the text has {e}") from None
        n = int(0.9 * len(self.data))  # first 90% trains, the rest validates
        self.train = self.data[:n]
        self.val = self.data[n:]


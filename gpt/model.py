"""Every stage of the lecture's GPT, built only on tinytensor; read from small to big.

    config = GPTConfig(vocab_size=65, block_size=64, n_embd=128, n_head=4, n_layer=4, dropout=0.0)
    model = build_model("gpt", config)          # the same as GPTLanguageModel(config)
    logits, loss = model(x, y)                  # x, y: integer arrays (B, T)
    out = model.generate(x[:1, :1], max_new_tokens=100, rng=np.random.default_rng(0))

The stages (MODELS), in the order the lecture builds them, each adding one idea:
    bigram       a (vocab, vocab) table: the next token's logits from the current token alone
    bigram_pos   token + position embeddings (n_embd wide), then an lm_head Linear
    single_head  + one causal self-attention head of size n_embd
    multi_head   + n_head heads of size n_embd // n_head, side by side
    ffwd         + a position-wise feed-forward layer (Linear, ReLU) after the attention
    blocks       n_layer Blocks: attention with a projection, 4x feed-forward, residual connections
    layernorm    + a LayerNorm before attention and before feed-forward, and a final one
    gpt          + dropout: the lecture's final GPTLanguageModel
Every stage but "gpt" has no dropout and ignores config.dropout.

Shapes: B batch, T time (context length), C = n_embd, nh heads of size hs = C // nh, V vocab.
"""
import numbers
from dataclasses import dataclass, replace

import numpy as np

import tinytensor as tt
from tinytensor import nn
from tinytensor.nn import functional as F


# ---------------------------------------------------------------- attention, as the lecture writes it
class Head(nn.Module):
    """ one head of self-attention (the lecture's Head) """

    def __init__(self, n_embd, head_size, block_size, dropout=0.0):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        self.register_buffer('tril', tt.tril(tt.ones(block_size, block_size)))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        # input of size (batch, time-step, channels)
        # output of size (batch, time-step, head size)
        B, T, C = x.shape
        k = self.key(x)    # (B,T,hs)
        q = self.query(x)  # (B,T,hs)
        # compute attention scores ("affinities")
        wei = q @ k.transpose(-2, -1) * k.shape[-1]**-0.5  # (B, T, hs) @ (B, hs, T) -> (B, T, T)
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float('-inf'))  # (B, T, T)
        wei = F.softmax(wei, dim=-1)  # (B, T, T)
        wei = self.dropout(wei)
        # perform the weighted aggregation of the values
        v = self.value(x)  # (B,T,hs)
        out = wei @ v  # (B, T, T) @ (B, T, hs) -> (B, T, hs)
        return out


class MultiHeadAttention(nn.Module):
    """ multiple heads of self-attention in parallel (the lecture's); proj=False: the
    multi_head stage, which has no projection yet """

    def __init__(self, n_embd, num_heads, head_size, block_size, dropout=0.0, proj=True):
        super().__init__()
        self.heads = nn.ModuleList([Head(n_embd, head_size, block_size, dropout)
                                    for _ in range(num_heads)])
        self.proj = nn.Linear(head_size * num_heads, n_embd) if proj else None
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        out = tt.cat([h(x) for h in self.heads], dim=-1)  # (B, T, nh*hs): heads side by side
        if self.proj is not None:
            out = self.dropout(self.proj(out))  # (B, T, C)
        return out


# ---------------------------------------------------------------- attention, batched (nanoGPT)
class KVCache:
    """The keys and values of the positions seen so far, for one attention layer.

    generate() keeps one per attention layer, so a new token costs one position instead of
    the whole context. Buffers (B, nh, max_len, hs) are allocated at the first update.
    """

    def __init__(self, max_len):
        self.max_len = max_len
        self.length = 0  # positions cached so far: the next token's position
        self.k = self.v = None

    def update(self, k, v):
        """Append keys and values (B, nh, T, hs); return all cached so far, (B, nh, length, hs)."""
        B, nh, T, hs = k.shape
        end = self.length + T
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions, {end} requested")
        if self.k is None:
            self.k = tt.zeros(B, nh, self.max_len, hs, dtype=k.dtype, device=k.device)
            self.v = tt.zeros(B, nh, self.max_len, hs, dtype=v.dtype, device=v.device)
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def _layer_cache(kv_cache, i):
    return None if kv_cache is None else kv_cache[i]


class CausalSelfAttention(nn.Module):
    """The heads of MultiHeadAttention computed together, as nanoGPT does.

    One Linear gives the queries, keys and values of every head: its weight (3*nh*hs, C) stacks
    the lecture's per-head query, key and value weights (hs, C) - all queries first (head h in
    rows h*hs:(h+1)*hs), then all keys, then all values - so it equals MultiHeadAttention of
    Heads with those weights (tests/test_gpt_model.py checks it). The heads' outputs sit side
    by side (the lecture's torch.cat over heads), then go through the projection.

    fused=True computes the attention with F.scaled_dot_product_attention (tinytensor's fused
    causal attention behind torch's name, as nanoGPT's flash path); fused=False writes it out
    as the lecture does (tril mask, softmax, dropout): the same result, slower.
    """

    def __init__(self, n_embd, n_head, block_size, dropout=0.0, fused=True):
        super().__init__()
        self.n_head, self.head_size, self.fused = n_head, n_embd // n_head, fused
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.attn_dropout = nn.Dropout(dropout)  # on the attention weights (the lecture's Head.dropout)
        self.proj = nn.Linear(n_embd, n_embd)
        self.dropout = nn.Dropout(dropout)       # on the output (the lecture's MultiHeadAttention.dropout)
        if not fused:  # the mask of the written-out path (not saved: the fused path has none)
            self.register_buffer('tril', tt.tril(tt.ones(block_size, block_size)), persistent=False)

    def forward(self, x, kv_cache=None):
        B, T, C = x.shape
        nh, hs = self.n_head, self.head_size
        q, k, v = self.qkv(x).split(C, dim=2)                       # each (B, T, C)
        q = q.view(B, T, nh, hs).transpose(1, 2)                    # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)                    # (B, nh, T, hs)
        v = v.view(B, T, nh, hs).transpose(1, 2)                    # (B, nh, T, hs)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)                            # (B, nh, Tk, hs): earlier positions too
        Tk = k.shape[2]
        if self.fused:
            p = self.attn_dropout.p if self.training else 0.0
            # query i sits at position Tk - T + i and sees keys 0 .. Tk - T + i
            mask = None if T in (1, Tk) else tt.tril(tt.ones(T, Tk, dtype=tt.bool), diagonal=Tk - T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p,
                                               is_causal=T == Tk and T > 1)  # (B, nh, T, hs)
        else:
            att = q @ k.transpose(-2, -1) * hs**-0.5                # (B, nh, T, Tk) affinities
            att = att.masked_fill(self.tril[Tk - T:Tk, :Tk] == 0, float('-inf'))
            att = F.softmax(att, dim=-1)                            # (B, nh, T, Tk)
            att = self.attn_dropout(att)
            y = att @ v                                             # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)            # (B, T, C): heads side by side
        return self.dropout(self.proj(y))                           # (B, T, C)


# ---------------------------------------------------------------- feed-forward and blocks
class FeedForward(nn.Module):
    """The lecture's FeedFoward: Linear to 4*C, ReLU, Linear back to C, dropout.

    fused=True runs the first Linear and the ReLU as one op (F.linear_relu): the same result.
    """

    def __init__(self, n_embd, dropout=0.0, fused=True):
        super().__init__()
        self.fused = fused
        self.net = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.ReLU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        if not self.fused:
            return self.net(x)
        fc, _, proj, dropout = self.net
        h = F.linear_relu(x, fc.weight, fc.bias)                   # (B, T, 4*C)
        return dropout(proj(h))                                     # (B, T, C)


class ResidualBlock(nn.Module):
    """The 'blocks' stage: communication (attention) then computation (feed-forward), each
    added to the residual stream."""

    def __init__(self, n_embd, n_head, block_size, dropout=0.0, fused=True):
        super().__init__()
        self.sa = CausalSelfAttention(n_embd, n_head, block_size, dropout, fused)
        self.ffwd = FeedForward(n_embd, dropout, fused)

    def forward(self, x, kv_cache=None):
        x = x + self.sa(x, kv_cache)
        return x + self.ffwd(x)


class Block(ResidualBlock):
    """The lecture's Block: a pre-LayerNorm residual block."""

    def __init__(self, n_embd, n_head, block_size, dropout=0.0, fused=True):
        super().__init__(n_embd, n_head, block_size, dropout, fused)
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)

    def forward(self, x, kv_cache=None):
        x = x + self.sa(self.ln1(x), kv_cache)
        return x + self.ffwd(self.ln2(x))


# ---------------------------------------------------------------- config
@dataclass
class GPTConfig:
    vocab_size: int = 65     # distinct tokens (tiny Shakespeare has 65 characters)
    block_size: int = 256    # the longest context, in tokens
    n_embd: int = 384        # width of the embeddings and of the residual stream (C)
    n_head: int = 6          # attention heads per layer, each of size n_embd // n_head
    n_layer: int = 6         # Transformer blocks
    dropout: float = 0.2     # dropout probability while training (0.0 turns it off)
    fused: bool = True       # fused attention (F.scaled_dot_product_attention) and linear+ReLU;
                             # False: the ops written out as in the lecture (same result, slower)

    def validate(self):
        """Raise ValueError, in one line, for a config that cannot build a model."""
        for name in ("vocab_size", "block_size", "n_embd", "n_head", "n_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                             f"each head gets n_embd // n_head channels")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) \
                or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {self.dropout!r}")
        if not isinstance(self.fused, bool):
            raise ValueError(f"fused must be True or False, got {self.fused!r}")
        return self


# ---------------------------------------------------------------- sampling
def sample_next(logits, temperature=1.0, top_k=None, rng=None, top_p=None):
    """One token per row of logits (B, V), as an int64 array (B,).

    In the order torch-based samplers apply them: only the top_k largest logits kept (ties with
    the k-th kept too; the same set before or after the temperature), softmax(logits /
    temperature), then only the nucleus, the smallest set of the likeliest tokens whose
    probability reaches top_p (always at least one); then inverse-CDF sampling with one
    rng.random() draw per row - so two computations of the same logits (cached and recomputed)
    draw the same tokens from the same rng. The softmax is computed as
    exp((logits - max) / temperature): a temperature so small that this overflows (1e-320)
    leaves only the likeliest tokens, the greedy choice that is the limit as the temperature goes
    to 0, without NumPy's overflow warnings.
    """
    check_sampling(temperature, top_k, top_p)
    rng = rng if rng is not None else tt.random.rng()
    logits = np.asarray(logits, dtype=np.float64)                      # (B, V)
    if top_k is not None and top_k < logits.shape[1]:
        kth = np.partition(logits, -top_k, axis=1)[:, -top_k, None]   # (B, 1) the k-th largest
        logits = np.where(logits < kth, -np.inf, logits)
    with np.errstate(over="ignore"):  # a tiny temperature: -inf, probability 0
        z = (logits - logits.max(axis=1, keepdims=True)) / temperature  # (B, V), <= 0
    probs = np.exp(z)                                                  # (B, V), unnormalised
    if top_p is not None and top_p < 1.0:
        probs = nucleus(probs, top_p)
    cdf = np.cumsum(probs, axis=1)                                     # (B, V)
    u = (1.0 - rng.random(len(cdf)))[:, None] * cdf[:, -1:]          # (B, 1), in (0, total]
    return np.minimum((cdf < u).sum(axis=1), cdf.shape[1] - 1).astype(np.int64)


def nucleus(probs, top_p):
    """probs (B, V), unnormalised, with every token outside each row's nucleus set to 0: the
    nucleus is the smallest set of the likeliest tokens whose probability reaches top_p, found
    by sorting the row, most likely first, and keeping each token while the probability of the
    ones before it is still below top_p (so the likeliest is always kept)."""
    order = np.argsort(-probs, axis=1, kind="stable")                 # (B, V) likeliest first
    p = np.take_along_axis(probs, order, axis=1)
    p = p / p.sum(axis=1, keepdims=True)
    before = np.cumsum(p, axis=1) - p                                 # mass of the tokens before
    keep = np.zeros(probs.shape, dtype=bool)
    np.put_along_axis(keep, order, before < top_p, axis=1)
    return np.where(keep, probs, 0.0)


def check_sampling(temperature, top_k, top_p=None):
    """ValueError, in one line, unless temperature is a positive finite number, top_k a
    positive integer or None (no limit; one larger than the vocabulary is no limit either) and
    top_p a number in (0, 1] or None (1 and None: no limit)."""
    if isinstance(temperature, bool) or not (isinstance(temperature, numbers.Real)
                                             and np.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                              or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, numbers.Real) and not isinstance(top_p, bool)
                                  and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be a number in (0, 1] or None, got {top_p!r}")


def _index_array(idx, what="idx", shape=None):
    """idx (an integer ndarray, Tensor or nested list of shape (B, T)) as an array."""
    idx = idx.data if isinstance(idx, tt.Tensor) else idx
    if not hasattr(idx, "dtype"):
        idx = np.asarray(idx)
    if idx.dtype.kind not in "iu" or idx.ndim != 2 or 0 in idx.shape:
        raise ValueError(f"{what} must be a non-empty integer array of shape (B, T), got shape "
                         f"{tuple(idx.shape)} and dtype {idx.dtype}")
    if shape is not None and idx.shape != shape:
        raise ValueError(f"{what} must have the shape of idx, {shape}, got {idx.shape}")
    return idx


def _init_weights(module):
    """The lecture's init: Linear and Embedding weights N(0, 0.02), biases zero, drawn from
    tinytensor's random stream (tt.manual_seed fixes them)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        w = module.weight
        w.data[...] = tt.random.rng().normal(0.0, 0.02, size=w.shape)
        if getattr(module, "bias", None) is not None:
            module.bias.data[...] = 0


# ---------------------------------------------------------------- the models
class LanguageModel(nn.Module):
    """What every stage shares: the loss and generate(). A stage defines forward_logits."""

    block_size = None          # the longest context (None: any length)
    n_attention_layers = 0     # KV caches generate() keeps (0: it recomputes every step)

    def forward_logits(self, idx, kv_cache=None):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, idx, targets=None, kv_cache=None):
        """logits (B, T, V) for idx (B, T), and the mean cross-entropy against targets (B, T)."""
        logits = self.forward_logits(_index_array(idx), kv_cache)    # (B, T, V)
        if targets is None:
            return logits, None
        B, T, V = logits.shape
        targets = _index_array(targets, "targets", (B, T))
        # one row per position: (B*T, V) logits against (B*T,) next tokens, as the lecture's .view
        loss = F.cross_entropy(logits.reshape(B * T, V), targets.reshape(B * T))
        return logits, loss

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, rng=None, use_cache=True,
                 top_p=None):
        """idx (B, T) extended by max_new_tokens sampled tokens: an int64 array (B, T + new).

        Each step looks at the last block_size tokens, takes the logits of the last position and
        samples with sample_next (temperature, top_k, top_p; rng a numpy Generator, by default
        tinytensor's stream). With use_cache (the attention models), earlier positions' keys and
        values are kept, so a step computes one position. Once the context is full the window
        slides, every position moves and the cache is refilled from the window - what
        use_cache=False does every step - so both give the same tokens for the same rng.
        Runs in eval mode (no dropout) and records no graph.
        """
        idx = tt.tensor(_index_array(idx)).numpy().astype(np.int64)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
                or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens!r}")
        check_sampling(temperature, top_k, top_p)
        block = self.block_size
        use_cache = use_cache and self.n_attention_layers > 0
        cache = None
        was_training = self.training
        self.eval()
        try:
            with tt.no_grad():
                for _ in range(max_new_tokens):
                    context = idx if block is None else idx[:, -block:]   # (B, <= block_size)
                    if not use_cache:
                        logits, _ = self(context)
                    elif cache is None or cache[0].length == block:        # first step, or the window slid
                        cache = [KVCache(block) for _ in range(self.n_attention_layers)]
                        logits, _ = self(context, kv_cache=cache)
                    else:                                                  # one new position
                        logits, _ = self(idx[:, -1:], kv_cache=cache)
                    last = logits[:, -1, :].numpy()                        # (B, V)
                    next_token = sample_next(last, temperature, top_k, rng, top_p)  # (B,)
                    idx = np.concatenate([idx, next_token[:, None]], axis=1)  # (B, T+1)
        finally:
            self.train(was_training)
        return idx


class BigramLanguageModel(LanguageModel):
    """The lecture's first model: each token reads the logits of the next one from a table."""

    def __init__(self, vocab_size):
        super().__init__()
        if isinstance(vocab_size, GPTConfig):  # build_model-style call
            vocab_size = vocab_size.vocab_size
        GPTConfig(vocab_size=vocab_size).validate()
        self.vocab_size = vocab_size
        self.token_embedding_table = nn.Embedding(vocab_size, vocab_size)
        self.apply(_init_weights)

    def forward_logits(self, idx, kv_cache=None):
        return self.token_embedding_table(idx)                          # (B, T, V)


class PositionalLanguageModel(LanguageModel):
    """Token + position embeddings, a body, then lm_head. The 'bigram_pos' stage, whose body
    does nothing; each later stage builds its body in build_body and runs it in body."""

    uses_dropout = False       # only the final GPT has dropout layers

    def __init__(self, config):
        super().__init__()
        config.validate()
        if not self.uses_dropout:
            config = replace(config, dropout=0.0)
        self.config = config
        self.block_size = config.block_size
        C = config.n_embd
        self.token_embedding_table = nn.Embedding(config.vocab_size, C)
        self.position_embedding_table = nn.Embedding(config.block_size, C)
        self.build_body(config)
        self.lm_head = nn.Linear(C, config.vocab_size)
        self.apply(_init_weights)

    def build_body(self, config):
        pass

    def body(self, x, kv_cache=None):
        return x

    def positions(self, idx, kv_cache=None):
        """(idx as an index array, the positions of its tokens): 0 .. T-1, or after the
        positions a kv_cache holds already."""
        idx = _index_array(idx)
        start = 0 if kv_cache is None else kv_cache[0].length          # positions already cached
        end = start + idx.shape[1]
        if end > self.block_size:
            raise ValueError(f"the context has {end} tokens but block_size is {self.block_size}: "
                             f"crop it to its last {self.block_size} tokens")
        return idx, np.arange(start, end)

    def forward_logits(self, idx, kv_cache=None):
        idx, positions = self.positions(idx, kv_cache)
        x = self.token_embedding_table(idx) + self.position_embedding_table(positions)  # (B, T, C)
        x = self.body(x, kv_cache)                                       # (B, T, C)
        return self.lm_head(x)                                           # (B, T, V)


class SingleHeadModel(PositionalLanguageModel):
    """+ one self-attention Head of size n_embd: tokens look at the ones before them.
    (generate() recomputes the context every step: the lecture's Head keeps no cache.)"""

    def build_body(self, config):
        self.sa_head = Head(config.n_embd, config.n_embd, config.block_size)

    def body(self, x, kv_cache=None):
        return self.sa_head(x)                                          # (B, T, C)


class MultiHeadModel(PositionalLanguageModel):
    """+ n_head smaller Heads side by side: several independent channels of communication."""

    def build_body(self, config):
        C, nh = config.n_embd, config.n_head
        self.sa_heads = MultiHeadAttention(C, nh, C // nh, config.block_size, proj=False)

    def body(self, x, kv_cache=None):
        return self.sa_heads(x)                                         # (B, T, C)


class FeedForwardModel(MultiHeadModel):
    """+ a feed-forward layer: each token thinks about what it gathered."""

    def build_body(self, config):
        super().build_body(config)
        self.ffwd = nn.Sequential(nn.Linear(config.n_embd, config.n_embd), nn.ReLU())

    def body(self, x, kv_cache=None):
        return self.ffwd(super().body(x, kv_cache))                    # (B, T, C)


class ResidualBlocksModel(PositionalLanguageModel):
    """n_layer residual blocks (attention with projection, 4x feed-forward): a deep network
    that still trains, thanks to the residual connections."""

    def build_body(self, config):
        self.n_attention_layers = config.n_layer
        self.blocks = nn.ModuleList([ResidualBlock(config.n_embd, config.n_head, config.block_size,
                                                   fused=config.fused)
                                     for _ in range(config.n_layer)])

    def body(self, x, kv_cache=None):
        for i, block in enumerate(self.blocks):
            x = block(x, _layer_cache(kv_cache, i))                     # (B, T, C)
        return x


class GPTLanguageModel(PositionalLanguageModel):
    """The lecture's final model: pre-LayerNorm Blocks with dropout, a final LayerNorm, lm_head.

    With config.dropout = 0 it is the 'layernorm' stage.
    """

    uses_dropout = True

    def build_body(self, config):
        self.n_attention_layers = config.n_layer
        self.blocks = nn.ModuleList([Block(config.n_embd, config.n_head, config.block_size,
                                           config.dropout, config.fused)
                                     for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)

    def forward(self, idx, targets=None, kv_cache=None):
        """logits (B, T, V) for the tokens idx (B, T), and their mean cross-entropy against the
        next tokens targets (B, T) (None without targets). With kv_cache (one KVCache per
        block) idx continues the positions cached so far."""
        idx, positions = self.positions(idx, kv_cache)
        B, T = idx.shape
        tok_emb = self.token_embedding_table(idx)                       # (B, T, C)
        pos_emb = self.position_embedding_table(positions)              # (T, C)
        x = tok_emb + pos_emb                                           # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, None if kv_cache is None else kv_cache[i])     # (B, T, C)
        x = self.ln_f(x)                                                # (B, T, C)
        logits = self.lm_head(x)                                        # (B, T, V)
        if targets is None:
            return logits, None
        targets = _index_array(targets, "targets", (B, T))
        # one row per position: (B*T, V) logits against (B*T,) next tokens, as the lecture's .view
        loss = F.cross_entropy(logits.view(B * T, logits.shape[-1]), targets.reshape(B * T))
        return logits, loss


def _layernorm_stage(config):
    """The 'layernorm' stage: the final architecture before dropout was added."""
    return GPTLanguageModel(replace(config, dropout=0.0))


def _bigram_stage(config):
    return BigramLanguageModel(config.vocab_size)


# name -> builder(config), in the lecture's order (train.py's --model)
MODELS = {
    "bigram": _bigram_stage,
    "bigram_pos": PositionalLanguageModel,
    "single_head": SingleHeadModel,
    "multi_head": MultiHeadModel,
    "ffwd": FeedForwardModel,
    "blocks": ResidualBlocksModel,
    "layernorm": _layernorm_stage,
    "gpt": GPTLanguageModel,
}


def build_model(name, config):
    """The model of stage `name` (a key of MODELS) for config."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
    config.validate()
    return MODELS[name](config)

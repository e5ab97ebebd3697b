"""The lecture's gpt.py model in PyTorch: the reference the tinytensor GPT is checked against.

Written in the lecture's style (Head, MultiHeadAttention, FeedFoward, Block,
GPTLanguageModel; one key/query/value Linear per head and a registered `tril` buffer), so its
state_dict() has exactly the lecture's names and shapes. The lecture reads its hyperparameters
from module globals; here they are constructor arguments, so tests can build tiny models.
"""
import torch
import torch.nn as nn
from torch.nn import functional as F


class Head(nn.Module):
    """A single causal self-attention head."""

    def __init__(self, n_embd, head_size, block_size, dropout):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size)))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape
        k = self.key(x)                                          # (B, T, hs)
        q = self.query(x)                                        # (B, T, hs)
        wei = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5      # (B, T, T) scaled affinities
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float("-inf"))  # no look-ahead
        wei = F.softmax(wei, dim=-1)                             # (B, T, T)
        wei = self.dropout(wei)
        v = self.value(x)                                        # (B, T, hs)
        return wei @ v                                           # (B, T, hs)


class MultiHeadAttention(nn.Module):
    """num_heads heads run side by side, concatenated, then projected back to n_embd."""

    def __init__(self, n_embd, num_heads, head_size, block_size, dropout):
        super().__init__()
        self.heads = nn.ModuleList([Head(n_embd, head_size, block_size, dropout)
                                    for _ in range(num_heads)])
        self.proj = nn.Linear(head_size * num_heads, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        out = torch.cat([h(x) for h in self.heads], dim=-1)     # (B, T, num_heads * hs)
        return self.dropout(self.proj(out))                      # (B, T, C)


class FeedFoward(nn.Module):  # sic: the lecture's spelling
    """Position-wise MLP: widen 4x, ReLU, project back."""

    def __init__(self, n_embd, dropout):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(n_embd, 4 * n_embd),
            nn.ReLU(),
            nn.Linear(4 * n_embd, n_embd),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        return self.net(x)


class Block(nn.Module):
    """Pre-LayerNorm residual block: attention (communicate), then MLP (compute)."""

    def __init__(self, n_embd, n_head, block_size, dropout):
        super().__init__()
        head_size = n_embd // n_head
        self.sa = MultiHeadAttention(n_embd, n_head, head_size, block_size, dropout)
        self.ffwd = FeedFoward(n_embd, dropout)
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)

    def forward(self, x):
        x = x + self.sa(self.ln1(x))
        x = x + self.ffwd(self.ln2(x))
        return x


class GPTLanguageModel(nn.Module):
    """Embeddings, n_layer Blocks, final LayerNorm and the language-model head."""

    def __init__(self, vocab_size, block_size=256, n_embd=384, n_head=6, n_layer=6, dropout=0.2):
        super().__init__()
        self.block_size = block_size
        self.token_embedding_table = nn.Embedding(vocab_size, n_embd)
        self.position_embedding_table = nn.Embedding(block_size, n_embd)
        self.blocks = nn.Sequential(*[Block(n_embd, n_head, block_size, dropout)
                                      for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        # N(0, 0.02) weights and zero biases, as the lecture's final code does
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):
        """logits (B, T, vocab_size) for idx (B, T), and the cross-entropy against targets."""
        B, T = idx.shape
        tok_emb = self.token_embedding_table(idx)                                  # (B, T, C)
        pos_emb = self.position_embedding_table(torch.arange(T, device=idx.device))  # (T, C)
        x = tok_emb + pos_emb                                                      # (B, T, C)
        x = self.blocks(x)                                                         # (B, T, C)
        x = self.ln_f(x)                                                           # (B, T, C)
        logits = self.lm_head(x)                                                   # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(B * T, -1), targets.view(B * T))
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens):
        """Append max_new_tokens tokens sampled with torch.multinomial to idx (B, T)."""
        for _ in range(max_new_tokens):
            logits, _ = self(idx[:, -self.block_size:])         # the last block_size tokens
            probs = F.softmax(logits[:, -1, :], dim=-1)          # (B, V) at the last position
            idx_next = torch.multinomial(probs, num_samples=1)   # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)              # (B, T+1)
        return idx

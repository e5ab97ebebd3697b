#!/usr/bin/env python
"""Tokens/s of GPTLanguageModel.generate on the CPU, with and without its KV cache, against a
PyTorch model with a KV cache that has the same architecture and the same weights.

    python benchmarks/bench_generate.py                        # small and lecture, batch 1 and 8
    python benchmarks/bench_generate.py --preset small --batch 1 --tokens 32
    python benchmarks/bench_generate.py --json

Each batch row grows from a prompt of one token (row i: token i) by --tokens new tokens
(default: block_size - 1, filling the context once). tokens/s counts the new tokens of all rows:
batch x tokens / seconds. The two sides, each in a worker process of its own
(benchmarks/common.py says why), with the weights of one initialisation:

    tinytensor   gpt.model's GPTLanguageModel.generate with its KV cache (temperature 1,
                 sample_next with a numpy Generator); once more without the cache
                 ("recompute": the whole context every step), which must draw the same tokens
    torch        the nanoGPT-style model of bench_step.py (fused_torch_model: tinytensor's
                 parameter names and layout, the weights loaded from tinytensor's state_dict)
                 generating with a KV cache as nanoGPT / gpt-fast users write it:
                 preallocated (B, nh, block_size, hs) keys and values per layer, the prompt in
                 one forward, then one position per step through F.scaled_dot_product_attention,
                 torch.multinomial on the softmax (temperature 1), in eval mode under
                 torch.inference_mode()

    numpy        the floor: the same decode with the KV cache written straight in NumPy from
                 tinytensor's state_dict (numpy_kv_generate below: the products, layer norms,
                 attention and sampling, no autograd library), in tinytensor's worker with its
                 random stream, so it must draw the same tokens as tinytensor's cache ("same as
                 NumPy"). "tt/NumPy" is what the library's per-op bookkeeping costs - modules,
                 functional checks, the dispatch to a fused op's version, Function.apply and a
                 Tensor per op - on top of the arithmetic (< 1: tinytensor is slower)

tinytensor and torch draw a token per row per step from the softmax of the last logits, so
they do the same work per token (not the same tokens: their random streams differ). To check that both compute
the same function, each first decodes greedily (argmax; top_k=1 in tinytensor) for up to 32
tokens from the same prompt: "same as torch" says whether the tokens are equal.

Timing: after an untimed generation each of the same length (a first pass over each length is
slower), the two take --repeat turns (the order alternating, --gap seconds of rest before each,
so the other framework's BLAS/OpenMP threads have stopped spinning; the NumPy floor runs right
after tinytensor, in its worker) and the table shows the median; "tt/torch" is tinytensor's
tokens/s over torch's (> 1: tinytensor is faster). The recompute path runs once, after them and
a short warm-up (it is slow and only gives the cache's speed-up). Each (preset, batch) gets
fresh workers, so "peak MB" (VmHWM, which includes the framework) is that run's own. Last, one
more generation per side, profiled and untimed, counts the calls the interpreter makes
(common.python_calls: Python functions and the C functions they call) per position: "calls per
position". --no-torch times tinytensor alone.

With the PyTorch model --tokens is at most block_size - 1: from there on tinytensor's window
slides and its cache is refilled every step, as generate() documents, which the PyTorch model
does not do. --no-torch allows more; the NumPy floor, whose cache does not slide either, then
is left out.

Threads: --threads (default: every usable core) for both frameworks, through OMP_NUM_THREADS,
OPENBLAS_NUM_THREADS and MKL_NUM_THREADS in the workers and torch.set_num_threads.
"""
import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

CHECK_TOKENS = 32  # greedy tokens compared between tinytensor and torch


def config_of(preset):
    return {k: common.PRESETS[preset][k] for k in ("block_size", "n_embd", "n_head", "n_layer", "dropout")}


def prompt_of(batch):
    """The prompt, int64 (batch, 1): row i is token i (mod the vocabulary), so rows differ."""
    import numpy as np
    return (np.arange(batch, dtype=np.int64) % common.VOCAB)[:, None]


# ----------------------------------------------------------------- workers
def tinytensor_worker(preset, batch, seed, weights):
    import numpy as np

    import tinytensor as tt
    from gpt.model import GPTConfig, GPTLanguageModel
    tt.malloc.keep_freed_memory()  # no optimizer here to do it (tinytensor.malloc)
    tt.manual_seed(seed)
    config = config_of(preset)
    model = GPTLanguageModel(GPTConfig(vocab_size=common.VOCAB, **config))
    prompt = prompt_of(batch)
    state = model.state_dict()

    def setup(tokens):
        """Save the weights for torch; warm-up generations: as long as the timed ones with the
        cache (the first pass over each length is slower), a short one without, and the NumPy
        floor's where its cache holds the tokens."""
        np.savez(weights, **{"ours/" + k: v for k, v in state.items()})
        model.generate(prompt, tokens, rng=np.random.default_rng(0))
        model.generate(prompt, min(tokens, 5), rng=np.random.default_rng(0), use_cache=False)
        if fits_without_sliding(preset, tokens):
            numpy_kv_generate(state, config, prompt, tokens, np.random.default_rng(0))
        return {"params": model.num_parameters()}

    def greedy(tokens):
        ids = model.generate(prompt, tokens, top_k=1, rng=np.random.default_rng(0))
        return {"ids": ids.tolist()}

    def generate(tokens, use_cache):
        t0 = time.perf_counter()
        ids = model.generate(prompt, tokens, rng=np.random.default_rng(seed), use_cache=use_cache)
        return {"s": time.perf_counter() - t0, "ids": ids.tolist()}

    def floor(tokens):
        t0 = time.perf_counter()
        ids = numpy_kv_generate(state, config, prompt, tokens, np.random.default_rng(seed))
        return {"s": time.perf_counter() - t0, "ids": ids.tolist()}

    def calls(tokens):
        """Python-level calls per position, with the cache, and the NumPy floor's."""
        got = {"tinytensor": common.python_calls(lambda: model.generate(
            prompt, tokens, rng=np.random.default_rng(seed))) / tokens}
        if fits_without_sliding(preset, tokens):
            got["numpy"] = common.python_calls(lambda: numpy_kv_generate(
                state, config, prompt, tokens, np.random.default_rng(seed))) / tokens
        return got

    return {"setup": setup, "greedy": greedy, "generate": generate, "floor": floor,
            "calls": calls, "memory": common.memory}


def fits_without_sliding(preset, tokens):
    """Whether `tokens` new tokens after a 1-token prompt fit the preset's block_size, so that a
    KV cache which never slides its window (torch_kv_generate's, the NumPy floor's) holds them."""
    return tokens <= common.PRESETS[preset]["block_size"] - 1


def numpy_kv_generate(state, config, idx, max_new_tokens, rng):
    """idx (B, T) extended by max_new_tokens tokens, int64 (B, T + new): GPTLanguageModel's
    generate with its KV cache (temperature 1, gpt.model.sample_next with the numpy Generator
    rng), written straight in NumPy from its state_dict `state` (config: bench presets' keys) -
    one position at a time, the prompt too, and no window sliding. The same arithmetic as
    tinytensor's (its products as (w @ x.T).T, the attention's scale on the queries), so the
    same tokens; what differs is only the library around it."""
    import numpy as np

    from gpt.model import sample_next
    B, T0 = idx.shape
    C, nh, n_layer, block = config["n_embd"], config["n_head"], config["n_layer"], config["block_size"]
    hs = C // nh
    p = state

    def layer_norm(x, name):                                        # (B, C)
        xc = x - x.mean(axis=-1, keepdims=True)
        rstd = 1 / np.sqrt((xc * xc).mean(axis=-1, keepdims=True) + 1e-5)
        return xc * rstd * p[name + ".weight"] + p[name + ".bias"]

    def linear(x, name, bias=True):                                 # (B, in) -> (B, out)
        y = (p[name + ".weight"] @ x.T).T
        return y + p[name + ".bias"] if bias else y

    dtype = p["lm_head.weight"].dtype
    keys = np.zeros((n_layer, B, nh, block, hs), dtype)            # the KV cache
    values = np.zeros((n_layer, B, nh, block, hs), dtype)
    scale = dtype.type(hs ** -0.5)
    out, token = [idx], idx[:, 0]
    for pos in range(T0 + max_new_tokens - 1):
        x = p["token_embedding_table.weight"][token] + p["position_embedding_table.weight"][pos]
        for i in range(n_layer):
            b = f"blocks.{i}."
            q, k, v = np.split(linear(layer_norm(x, b + "ln1"), b + "sa.qkv", bias=False), 3, axis=1)
            keys[i, :, :, pos], values[i, :, :, pos] = k.reshape(B, nh, hs), v.reshape(B, nh, hs)
            att = (q.reshape(B, nh, 1, hs) * scale) @ keys[i, :, :, :pos + 1].transpose(0, 1, 3, 2)
            att = np.exp(att - att.max(axis=-1, keepdims=True))      # (B, nh, 1, pos + 1)
            y = (att / att.sum(axis=-1, keepdims=True)) @ values[i, :, :, :pos + 1]  # (B, nh, 1, hs)
            x = x + linear(y.reshape(B, C), b + "sa.proj")
            x = x + linear(np.maximum(linear(layer_norm(x, b + "ln2"), b + "ffwd.net.0"), 0),
                           b + "ffwd.net.2")
        if pos + 1 < T0:                                            # still in the prompt
            token = idx[:, pos + 1]
            continue
        token = sample_next(linear(layer_norm(x, "ln_f"), "lm_head"), rng=rng)   # (B,)
        out.append(token[:, None])
    return np.concatenate(out, axis=1)


def torch_worker(preset, batch, seed, weights, threads):
    import numpy as np
    import torch
    torch.set_num_threads(threads)
    cfg = config_of(preset)
    w = {}

    def setup(tokens):
        """Load tinytensor's weights; a warm-up generation as long as the timed ones."""
        from bench_step import fused_torch_model
        arrays = np.load(weights)
        model = fused_torch_model(cfg)
        model.load_state_dict({k[len("ours/"):]: torch.from_numpy(arrays[k]) for k in arrays.files})
        w["model"] = model.eval()
        w["prompt"] = torch.from_numpy(prompt_of(batch))
        torch_kv_generate(model, w["prompt"], tokens, generator=torch.Generator().manual_seed(0))
        return {"params": sum(p.numel() for p in model.parameters())}

    def greedy(tokens):
        return {"ids": torch_kv_generate(w["model"], w["prompt"], tokens, greedy=True).tolist()}

    def calls(tokens):
        return {"torch": common.python_calls(lambda: torch_kv_generate(
            w["model"], w["prompt"], tokens, generator=torch.Generator().manual_seed(seed))) / tokens}

    def generate(tokens):
        gen = torch.Generator().manual_seed(seed)
        t0 = time.perf_counter()
        torch_kv_generate(w["model"], w["prompt"], tokens, generator=gen)
        return {"s": time.perf_counter() - t0}

    return {"setup": setup, "greedy": greedy, "generate": generate, "calls": calls,
            "memory": common.memory}


def torch_kv_generate(model, idx, max_new_tokens, greedy=False, generator=None):
    """idx (B, T) extended by max_new_tokens tokens, int64 (B, T + new), by fused_torch_model's
    `model` with a KV cache: each layer's keys and values go into preallocated
    (B, nh, block_size, hs) buffers; the prompt runs in one forward, then each step runs the one
    new position against every cached key. A token per row is drawn by torch.multinomial from
    softmax(logits) (temperature 1), or greedy: the argmax. No window sliding: the whole
    sequence but its last token (which is never fed back) must fit in block_size.

    As tinytensor's generate: one forward per new token, the last token's logits only."""
    import torch
    import torch.nn.functional as F

    B, T0 = idx.shape
    block = model.position_embedding_table.weight.shape[0]
    if T0 + max_new_tokens - 1 > block:
        raise ValueError(f"{T0} prompt tokens + {max_new_tokens} new ones do not fit in block_size "
                         f"{block}: this KV cache does not slide its window")
    first = model.blocks[0].sa
    nh, C = first.nh, first.proj.weight.shape[0]
    hs = C // nh
    with torch.inference_mode():
        caches = [(torch.empty(B, nh, block, hs), torch.empty(B, nh, block, hs))
                  for _ in model.blocks]

        def forward(tokens, pos):
            """logits (B, V) of the last of tokens (B, T), which sit at positions pos .. pos+T-1."""
            T = tokens.shape[1]
            x = model.token_embedding_table(tokens) \
                + model.position_embedding_table.weight[pos:pos + T]       # (B, T, C)
            for block_, (k_cache, v_cache) in zip(model.blocks, caches):
                sa = block_.sa
                q, k, v = sa.qkv(block_.ln1(x)).split(C, dim=2)            # each (B, T, C)
                q, k, v = (a.view(B, T, nh, hs).transpose(1, 2)            # (B, nh, T, hs)
                           for a in (q, k, v))
                k_cache[:, :, pos:pos + T] = k
                v_cache[:, :, pos:pos + T] = v
                # one query sees every cached key (no mask); several only in the prompt, from
                # position 0, where the keys are the queries' own positions (is_causal)
                y = F.scaled_dot_product_attention(q, k_cache[:, :, :pos + T], v_cache[:, :, :pos + T],
                                                   is_causal=T > 1)        # (B, nh, T, hs)
                y = y.transpose(1, 2).reshape(B, T, C)                     # (B, T, C)
                x = x + sa.proj(y)
                x = x + block_.ffwd.net(block_.ln2(x))                     # (B, T, C)
            return model.lm_head(model.ln_f(x[:, -1]))                     # (B, V)

        out = [idx]
        logits = forward(idx, 0)                                           # the prompt
        for i in range(max_new_tokens):
            if greedy:
                nxt = logits.argmax(dim=-1, keepdim=True)                  # (B, 1)
            else:
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)  # (B, 1)
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits = forward(nxt, T0 + i)
        return torch.cat(out, dim=1)                                       # (B, T0 + new)


# ----------------------------------------------------------------- the parent
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small,lecture", help="comma-separated: small, lecture")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default %(default)s)")
    p.add_argument("--tokens", type=int, default=None, help="new tokens per row (default: block_size - 1)")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed generations per side, taking turns; the median is shown (default %(default)s)")
    p.add_argument("--gap", type=float, default=0.3,
                   help="seconds of rest before each timed generation (default %(default)s)")
    p.add_argument("--threads", type=int, default=common.usable_cores())
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no-torch", dest="torch", action="store_false", help="skip the PyTorch model")
    p.add_argument("--json", action="store_true")
    common.add_speed_options(p)
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--_weights", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.presets = [s.strip() for s in args.preset.split(",") if s.strip()]
    bad = [s for s in args.presets if s not in common.PRESETS]
    if bad or not args.presets:
        p.error(f"--preset: choose from {', '.join(common.PRESETS)}, got {args.preset!r}")
    try:
        args.batches = [int(s) for s in args.batch.split(",") if s.strip()]
    except ValueError:
        args.batches = []
    if not args.batches or min(args.batches) < 1:
        p.error(f"--batch: comma-separated positive integers, got {args.batch!r}")
    if (args.tokens is not None and args.tokens < 1) or args.threads < 1 or args.repeat < 1 \
            or args.gap < 0:
        p.error("--tokens, --threads and --repeat must be positive, --gap not negative")
    for preset in args.presets:
        if args.torch and args.tokens is not None and not fits_without_sliding(preset, args.tokens):
            p.error(f"--tokens {args.tokens}: the PyTorch model's KV cache does not slide, so at "
                    f"most {common.PRESETS[preset]['block_size'] - 1} (block_size - 1) for the "
                    f"{preset} preset; --no-torch for more")
    return args


def run_one(args, preset, batch, tokens, log):
    """One preset at one batch size: the row of the table."""
    script = os.path.abspath(__file__)
    with tempfile.TemporaryDirectory() as tmp:
        extra = ["--preset", preset, "--batch", str(batch), "--seed", str(args.seed),
                 "--threads", str(args.threads), "--_weights", os.path.join(tmp, "weights.npz"),
                 "--accelerators", args.accelerators, "--mkl", args.mkl]
        workers = [common.Worker(script, "tinytensor", extra, args.threads)]
        try:
            workers[0].ask(cmd="setup", tokens=tokens)  # first: it writes the weights torch loads
            if args.torch:
                workers.append(common.Worker(script, "torch", extra, args.threads))
                workers[1].ask(cmd="setup", tokens=tokens)
                check = min(tokens, CHECK_TOKENS)
                greedy = [wk.ask(cmd="greedy", tokens=check)["ids"] for wk in workers]
            floor = fits_without_sliding(preset, tokens)
            times = {wk.kind: [] for wk in workers}
            if floor:
                times["numpy"] = []
            for r in range(args.repeat):
                for wk in (workers if r % 2 == 0 else workers[::-1]):  # the order alternates
                    time.sleep(args.gap)  # the other side's idle threads stop spinning
                    request = {"use_cache": True} if wk.kind == "tinytensor" else {}
                    got = wk.ask(cmd="generate", tokens=tokens, **request)
                    times[wk.kind].append(got["s"])
                    if wk.kind == "tinytensor":
                        cached_ids = got["ids"]
                        if floor:
                            got = wk.ask(cmd="floor", tokens=tokens)
                            times["numpy"].append(got["s"])
                            floor_ids = got["ids"]
                log(f"{preset} batch {batch}, turn {r + 1}/{args.repeat}: " + ", ".join(
                    f"{kind} {batch * tokens / ts[-1]:.0f} tok/s" for kind, ts in times.items()))
            time.sleep(args.gap)
            recompute = workers[0].ask(cmd="generate", tokens=tokens, use_cache=False)
            memory = {wk.kind: wk.ask(cmd="memory")["peak_mb"] for wk in workers}
            calls = {}  # profiled, untimed runs, after the timed ones
            for wk in workers:
                calls.update(wk.ask(cmd="calls", tokens=tokens))
        finally:
            for wk in workers:
                wk.close()
    new = batch * tokens
    row = {"batch": batch, "tokens": tokens,
           "cache_tokens_per_s": new / common.median(times["tinytensor"]),
           "cache_s_all": times["tinytensor"],
           "recompute_tokens_per_s": new / recompute["s"],
           "same_tokens": recompute["ids"] == cached_ids,
           "peak_mb": memory["tinytensor"], "calls_per_position": calls}
    row["cache_speedup"] = row["cache_tokens_per_s"] / row["recompute_tokens_per_s"]
    if floor:
        row.update(numpy_tokens_per_s=new / common.median(times["numpy"]), numpy_s_all=times["numpy"],
                   same_tokens_as_numpy=floor_ids == cached_ids)
        row["tinytensor_over_numpy"] = row["cache_tokens_per_s"] / row["numpy_tokens_per_s"]
    if args.torch:
        row.update(torch_tokens_per_s=new / common.median(times["torch"]), torch_s_all=times["torch"],
                   same_tokens_as_torch=greedy[0] == greedy[1], checked_tokens=check,
                   torch_peak_mb=memory["torch"])
        row["tinytensor_over_torch"] = row["cache_tokens_per_s"] / row["torch_tokens_per_s"]
    return row


def print_table(res):
    print(f"machine: {res['machine']}")
    print(f"tokens/s = batch x new tokens / s, from a 1-token prompt per row; median of "
          f"{res['repeat']} generations per side taking turns (recompute: 1)\n")
    print(f"{'preset':8s} {'block':>5s} {'batch':>5s} {'tokens':>6s} {'KV cache tok/s':>15s} "
          f"{'recompute tok/s':>16s} {'speed-up':>9s} {'same tokens':>12s} {'torch KV tok/s':>15s} "
          f"{'tt/torch':>9s} {'same as torch':>14s} {'NumPy tok/s':>12s} {'tt/NumPy':>9s} "
          f"{'same as NumPy':>14s} {'peak MB tt/torch':>17s}  calls per position")
    for preset, p in res["presets"].items():
        for r in p["batches"].values():
            if "torch_tokens_per_s" in r:
                torch_cols = (f"{r['torch_tokens_per_s']:15.0f} {r['tinytensor_over_torch']:8.2f}x "
                              f"{str(r['same_tokens_as_torch']):>14s}")
                memory = f"{r['peak_mb']:.0f} / {r['torch_peak_mb']:.0f}"
            else:
                torch_cols = f"{'-':>15s} {'-':>9s} {'-':>14s}"
                memory = f"{r['peak_mb']:.0f} / -"
            if "numpy_tokens_per_s" in r:
                floor_cols = (f"{r['numpy_tokens_per_s']:12.0f} {r['tinytensor_over_numpy']:8.2f}x "
                              f"{str(r['same_tokens_as_numpy']):>14s}")
            else:
                floor_cols = f"{'-':>12s} {'-':>9s} {'-':>14s}"
            print(f"{preset:8s} {p['config']['block_size']:5d} {r['batch']:5d} {r['tokens']:6d} "
                  f"{r['cache_tokens_per_s']:15.0f} {r['recompute_tokens_per_s']:16.0f} "
                  f"{r['cache_speedup']:8.1f}x {str(r['same_tokens']):>12s} {torch_cols} "
                  f"{floor_cols} {memory:>17s}  "
                  + ", ".join(f"{k} {v:,.0f}" for k, v in r["calls_per_position"].items()))

def main(argv=None):
    args = parse_args(argv)
    if args._worker == "tinytensor":
        common.use_accelerators(args.accelerators, args.mkl)
        common.serve(tinytensor_worker(args.presets[0], args.batches[0], args.seed, args._weights))
        return
    if args._worker == "torch":
        common.serve(torch_worker(args.presets[0], args.batches[0], args.seed, args._weights,
                                  args.threads))
        return
    log = (lambda *a: None) if args.json else (lambda *a: print(*a, file=sys.stderr, flush=True))
    res = {"machine": None, "tokens": args.tokens, "threads": args.threads, "repeat": args.repeat,
           "presets": {}}
    for preset in args.presets:
        tokens = args.tokens or common.PRESETS[preset]["block_size"] - 1
        res["presets"][preset] = {
            "config": config_of(preset), "tokens": tokens,
            "batches": {str(b): run_one(args, preset, b, tokens, log) for b in args.batches}}
    res["machine"] = common.machine(args.threads, args.accelerators, args.mkl)
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print_table(res)


if __name__ == "__main__":
    main()

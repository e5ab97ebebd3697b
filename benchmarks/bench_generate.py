#!/usr/bin/env python
"""Tokens/s of GPTLanguageModel.generate with and without the KV cache, on the CPU.

    python benchmarks/bench_generate.py                        # small and lecture configs
    python benchmarks/bench_generate.py --preset lecture --tokens 400
    python benchmarks/bench_generate.py --json

One sequence (batch 1) grows from a one-token prompt by --tokens sampled tokens (default:
block_size - 1, filling the context once), with the same numpy Generator seed for both paths,
so both sample the same tokens (checked). With the cache a step runs one position through the
model; without it, the whole context so far. Past block_size the window slides and the cached
path refills its cache from the window every step, as generate() documents, so longer runs
approach the recompute speed. For reference, the lecture's PyTorch model
(tests/torch_gpt_reference.py) generating the same number of tokens its way (no cache) runs in
a worker process (benchmarks/common.py); --no-torch skips it.
"""
import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import common  # noqa: E402

sys.path.insert(0, common.ROOT)


def config_of(preset):
    return {k: common.PRESETS[preset][k] for k in ("block_size", "n_embd", "n_head", "n_layer", "dropout")}


def tinytensor_generate(preset, tokens, seed):
    import numpy as np

    import tinytensor as tt
    from gpt.model import GPTConfig, GPTLanguageModel
    tt.malloc.keep_freed_memory()  # as train.py does
    tt.manual_seed(seed)
    model = GPTLanguageModel(GPTConfig(vocab_size=common.VOCAB, **config_of(preset)))
    prompt = np.zeros((1, 1), dtype=np.int64)
    model.generate(prompt, 5, rng=np.random.default_rng(0))  # warm-up
    out = {}
    for use_cache in (True, False):
        t0 = time.perf_counter()
        ids = model.generate(prompt, tokens, rng=np.random.default_rng(seed), use_cache=use_cache)
        out[use_cache] = (time.perf_counter() - t0, ids)
    return {"cache_s": out[True][0], "recompute_s": out[False][0],
            "same_tokens": bool(np.array_equal(out[True][1], out[False][1]))}


def torch_worker(preset, threads):
    import torch
    torch.set_num_threads(threads)

    def generate(tokens, seed):
        from torch_gpt_reference import GPTLanguageModel
        torch.manual_seed(seed)
        c = config_of(preset)
        model = GPTLanguageModel(common.VOCAB, c["block_size"], c["n_embd"], c["n_head"], c["n_layer"],
                                 c["dropout"]).eval()
        prompt = torch.zeros((1, 1), dtype=torch.long)
        model.generate(prompt, 5)
        t0 = time.perf_counter()
        model.generate(prompt, tokens)
        return {"s": time.perf_counter() - t0}
    return {"generate": generate}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small,lecture", help="comma-separated: small, lecture")
    p.add_argument("--tokens", type=int, default=None, help="new tokens per run (default: block_size - 1)")
    p.add_argument("--threads", type=int, default=common.usable_cores())
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--no-torch", dest="torch", action="store_false", help="skip the PyTorch reference")
    p.add_argument("--json", action="store_true")
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.presets = [s.strip() for s in args.preset.split(",") if s.strip()]
    bad = [s for s in args.presets if s not in common.PRESETS]
    if bad or not args.presets:
        p.error(f"--preset: choose from {', '.join(common.PRESETS)}, got {args.preset!r}")
    if (args.tokens is not None and args.tokens < 1) or args.threads < 1:
        p.error("--tokens and --threads must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args._worker:
        common.serve(torch_worker(args.presets[0], args.threads))
        return
    for var in common.THREAD_VARS:  # this process runs tinytensor: set before numpy loads
        os.environ[var] = str(args.threads)
    res = {"machine": None, "tokens": args.tokens, "threads": args.threads, "presets": {}}
    for preset in args.presets:
        tokens = args.tokens or common.PRESETS[preset]["block_size"] - 1
        r = tinytensor_generate(preset, tokens, args.seed)
        row = {"config": config_of(preset), "tokens": tokens, "same_tokens": r["same_tokens"],
               "cache_tokens_per_s": tokens / r["cache_s"],
               "recompute_tokens_per_s": tokens / r["recompute_s"]}
        row["cache_speedup"] = row["cache_tokens_per_s"] / row["recompute_tokens_per_s"]
        if args.torch:
            wk = common.Worker(os.path.abspath(__file__), "torch",
                               ["--preset", preset, "--threads", str(args.threads)], args.threads)
            try:
                took = wk.ask(cmd="generate", tokens=tokens, seed=args.seed)["s"]
                row["torch_tokens_per_s"] = tokens / took
            finally:
                wk.close()
        res["presets"][preset] = row
    res["machine"] = common.machine(args.threads)
    if args.json:
        print(json.dumps(res, indent=1))
        return
    print(f"machine: {res['machine']}")
    print("batch 1, from a 1-token prompt\n")
    print(f"{'preset':8s} {'block':>5s} {'tokens':>6s} {'KV cache tok/s':>15s} {'recompute tok/s':>16s} "
          f"{'speed-up':>9s} "
          f"{'same tokens':>12s} {'torch (no cache) tok/s':>23s}")
    for preset, r in res["presets"].items():
        torch_col = f"{r['torch_tokens_per_s']:23.0f}" if "torch_tokens_per_s" in r else f"{'-':>23s}"
        print(f"{preset:8s} {r['config']['block_size']:5d} {r['tokens']:6d} {r['cache_tokens_per_s']:15.0f} "
              f"{r['recompute_tokens_per_s']:16.0f} {r['cache_speedup']:8.1f}x {str(r['same_tokens']):>12s} "
              f"{torch_col}")


if __name__ == "__main__":
    main()

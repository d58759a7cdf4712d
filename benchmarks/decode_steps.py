#!/usr/bin/env python
"""Decode-step time of retrieve recipes vs ``full`` at long lengths, side by side, and where
each step's time goes (torch.profiler).

The default model's cache is filled with random keys and values of ``n`` entries per layer
(the model is not run over a context: a 32k-token prefill takes minutes on a CPU, and for the
methods measured here the cost of a step depends on the shapes only), then one token ends the
context as a one-token context chunk, so the methods that build an index at the end of the
prefill (ShadowKV's low-rank keys and landmarks, A2ATS's codes, Quest's page bounds) build it
over the random cache. Then decoding steps rotate over the recipes, each on its own copy of the
cache, so that load changes hit all alike. Reported per length: the median ms per step, its
ratio to ``full``'s, the mean's ratio (it counts a method's periodic steps, such as Recycled
Attention's full step every ``stride``: give ``--steps`` a multiple of it) and the physical limit of a step, (weight bytes + KV bytes the step must
read) / memory bandwidth measured in the same run (full reads every entry; a selection method
at least the entries it selects, per query head for per-head selections, plus its index).
On a random cache the query heads of a GQA group choose Quest pages independently, so the
union its KV head gathers is as large as it gets (``group x pages``): a worst case for Quest
(on the default model's real attention the union is about half of that); ``speed.py``
measures it on a real context. ShadowKV's and A2ATS's choices on random keys are as costly as
on real ones (the same shapes), their accuracy is not measured here.

    python benchmarks/decode_steps.py --lengths 16k,32k --steps 12 --threads 1
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from statistics import mean, median

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kvlab  # noqa: E402
from kvlab.bench.lengths import format_length, parse_length  # noqa: E402
from kvlab.engine.forward import Phase  # noqa: E402
from kvlab.recipe import parse_recipe  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from speed import PROFILE_PARTS, decode_profile, memory_bandwidth, weight_bytes  # noqa: E402

RECIPES = ("quest(budget=0.125)", "recycled_attention(budget=0.125)", "lychee(budget=0.125)",
           "tokenselect(budget=0.125)",
           "tokenselect(budget=0.125, selection_cache=0.9)", "shadowkv(budget=0.125)", "a2ats(budget=0.125)")


def filled(engine: kvlab.Engine, recipe: str, n: int, seed: int = 0) -> kvlab.Sequence:
    """A sequence of ``recipe`` whose every layer holds ``n`` random entries (8 real ones),
    the last one appended as the context's last chunk (the retrieve method's ``end_context``)."""
    sequence = engine.new_sequence(None if recipe == "full" else recipe)
    engine.prefill(sequence, [1] * 8, compress=True, progress=False)
    g = torch.Generator().manual_seed(seed)
    for layer in sequence.cache.layers:
        b, h, _, d = layer.keys.shape
        keys = torch.randn(b, h, n - 9, d, generator=g, dtype=layer.keys.dtype)
        layer.append(keys, torch.randn(keys.shape, generator=g, dtype=keys.dtype), torch.arange(8, n - 1))
    engine.forward(sequence, [1], Phase.CONTEXT_END)
    return sequence


def read_bytes(recipe: str, n: int, config, kv_bytes_per_entry: int) -> float:
    """KV bytes a decoding step must read at least: every entry for ``full``; for a selection
    method its selected entries (per query head when it selects per query head, Quest), and
    its index (Quest's page bounds, ShadowKV's landmarks and low-rank rows, A2ATS's codes).
    A lower bound, not a model of the implementation."""
    method = parse_recipe(recipe).retrieve if recipe != "full" else None
    if method is None:
        return n * kv_bytes_per_entry
    from kvlab.registry import resolve_budget

    selected = resolve_budget(method.budget, n)
    kv_heads, layers = config.num_key_value_heads, config.num_hidden_layers
    head_dim = kv_bytes_per_entry // (2 * kv_heads * layers * 4)
    if method.name == "quest":
        group = config.num_attention_heads // config.num_key_value_heads
        bounds = 2 * (n // method.page) * kv_bytes_per_entry / 2  # min and max key per page
        per_layer_dense = method.dense_layers / config.num_hidden_layers
        sparse = min(n, group * selected) * kv_bytes_per_entry + bounds
        return per_layer_dense * n * kv_bytes_per_entry + (1 - per_layer_dense) * sparse
    if method.name == "tokenselect":  # all keys scored, the selection read
        return n * kv_bytes_per_entry / 2 + (selected + method.n_init + method.n_local) * kv_bytes_per_entry
    if method.name == "lychee":  # retrieval heads (a share of the KV heads, all of layer 0) read everything
        whole = (1 + method.retrieval * (layers - 1)) / layers
        return whole * n * kv_bytes_per_entry + (1 - whole) * selected * kv_bytes_per_entry
    if method.name == "shadowkv":  # landmarks, the chosen chunks' U rows and values, exact chunks
        per_head = (n // method.chunk * head_dim + selected * (method.rank + head_dim)
                    + (method.outliers + method.local) * method.chunk * 2 * head_dim) * 4
        return per_head * kv_heads * layers
    if method.name == "a2ats":  # one byte a code, the fetched entries, sinks and window
        return (n * method.subspaces * kv_heads * layers
                + (selected + method.sink + method.window) * kv_bytes_per_entry)
    return selected * kv_bytes_per_entry  # recycled: between its full steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="16k,32k")
    parser.add_argument("--recipes", default="; ".join(RECIPES))
    parser.add_argument("--steps", type=int, default=12, help="timed steps per recipe and length")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "decode_steps.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipes = ["full", *(r.strip() for r in args.recipes.split(";") if r.strip())]
    for recipe in recipes[1:]:
        parse_recipe(recipe)
    engine = kvlab.load(progress=False)
    config = engine.config
    bandwidth = memory_bandwidth()
    weights = weight_bytes(engine.model)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_entry = 2 * config.num_key_value_heads * head_dim * 4 * config.num_hidden_layers  # K+V, fp32
    loads = [os.getloadavg()[0]]
    lines = [f"| length | recipe | ms/step | vs full | mean vs full's | bound (ms/step) | bound vs full's |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    profiles = []
    for text in args.lengths.split(","):
        n = parse_length(text)
        sequences = {r: filled(engine, r, n) for r in recipes}
        times: dict[str, list[float]] = {r: [] for r in recipes}
        for step in range(args.steps + 1):
            order = recipes[step % len(recipes):] + recipes[: step % len(recipes)]
            for recipe in order:
                start = time.perf_counter()
                engine.forward(sequences[recipe], [7 + step], Phase.DECODE)
                if step:  # the first round warms up
                    times[recipe].append(time.perf_counter() - start)
        base = median(times["full"])
        bound_full = (weights + read_bytes("full", n, config, per_entry)) / bandwidth
        for recipe in recipes:
            t = median(times[recipe])
            bound = (weights + read_bytes(recipe, n, config, per_entry)) / bandwidth
            lines.append(f"| {format_length(n)} | `{recipe}` | {t * 1000:.1f} | {t / base:.2f}x | "
                         f"{mean(times[recipe]) / mean(times['full']):.2f}x | "
                         f"{bound * 1000:.1f} | {bound / bound_full:.2f}x |")
            print(lines[-1], flush=True)
            parts = decode_profile(lambda: engine.forward(sequences[recipe], [5], Phase.DECODE))
            profiles.append((n, recipe, parts))
        loads.append(os.getloadavg()[0])
        del sequences
    header = (f"Measured {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} by "
              f"benchmarks/decode_steps.py: {engine.name} float32 on CPU, {torch.get_num_threads()} "
              f"torch threads, random cache, steps interleaved, medians of {args.steps}; memory "
              f"bandwidth {bandwidth / 1e9:.1f} GB/s measured in the run; weights "
              f"{weights / 2**20:.0f} MiB; 1-minute load average "
              f"{' -> '.join(f'{x:.2f}' for x in loads)}.")
    prof = ["One more step per recipe, torch.profiler, self CPU ms by part:", "",
            "| length | recipe | " + " | ".join(PROFILE_PARTS) + " | total |",
            "|---:|---|" + "---:|" * (len(PROFILE_PARTS) + 1)]
    for n, recipe, parts in profiles:
        prof.append(f"| {format_length(n)} | `{recipe}` | " + " | ".join(f"{parts[p]:.1f}" for p in PROFILE_PARTS)
                    + f" | {sum(parts.values()):.1f} |")
    text = "\n".join([header, "", *lines, "", *prof, ""])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

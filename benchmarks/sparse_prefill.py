#!/usr/bin/env python
"""One attention layer's prefill: dense causal SDPA vs kvlab's sparse prefill methods, interleaved.

Shapes of Qwen2.5-0.5B (14 query heads, 2 KV heads, d=64), random rotated q/k/v, the whole
prompt in one forward. For each length and repeat the variants run in rotating order; medians
are printed with the share of the causal query-key pairs each computed (counted by the kernels,
``LayerContext.count_pairs``) and the load average.
``--flex`` adds torch's flex_attention with a BlockMask built from block_sparse's tiles
(eager, and compiled if torch.compile works here).

    python benchmarks/sparse_prefill.py --lengths 4k,8k --repeats 3 --flex
"""

from __future__ import annotations

import argparse
import os
import time
from statistics import median

import torch
import torch.nn.functional as F

from kvlab.engine.cache import LayerKV
from kvlab.engine.context import LayerContext, Phase
from kvlab.engine.rotary import Rotary
from kvlab.position.base import TRAINED_ROPE
from kvlab.prefill.blocks import rotated
from kvlab.recipe import parse_recipe

RECIPES = ["ashape(sink=128, window=1024)", "tri_shape(sink=128, window=1024)", "vertical_slash",
           "block_sparse", "sale"]


def context(n: int, hq: int = 14, hk: int = 2, d: int = 64) -> tuple[LayerContext, torch.Tensor]:
    torch.manual_seed(0)
    layer = LayerKV()
    layer.append(torch.randn(1, hk, n, d), torch.randn(1, hk, n, d), torch.arange(n))
    rot = Rotary(1.0 / 10000 ** (torch.arange(0, d, 2).float() / d))
    ctx = LayerContext(0, 1, layer, torch.arange(n), rot, TRAINED_ROPE, d**-0.5, Phase.CONTEXT_END)
    return ctx, torch.randn(1, hq, n, d)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="4k,8k")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recipes", default="; ".join(RECIPES))
    parser.add_argument("--flex", action="store_true")
    parser.add_argument("--flex-recipe", default="block_sparse", help="a block_sparse recipe whose tiles flex uses")
    args = parser.parse_args()
    recipes = [r.strip() for r in args.recipes.split(";") if r.strip()]
    for length in args.lengths.split(","):
        n = int(float(length.rstrip("k")) * 1024) if length.endswith("k") else int(length)
        ctx, q = context(n)
        qr, keys, values = rotated(q, ctx)
        variants = {"dense": lambda: F.scaled_dot_product_attention(
            qr, keys, values, is_causal=True, scale=ctx.scaling, enable_gqa=True)}
        density = {"dense": 1.0}
        for recipe in recipes:
            method = parse_recipe(recipe).prefill
            variants[recipe] = (lambda m: lambda: m.attend(q, ctx))(method)
            ctx.pairs = [0]  # the pairs the method computes, counted where it computes them
            method.attend(q, ctx)
            density[recipe] = ctx.pairs[0] / (q.shape[1] * n * (n + 1) / 2)
            ctx.pairs = None
        if args.flex:
            from torch.nn.attention.flex_attention import BlockMask, flex_attention

            tiles = parse_recipe(args.flex_recipe).prefill.block_mask(qr, keys, ctx.positions)

            def causal_mod(b, h, i, j):
                return j <= i

            mask = BlockMask.from_dense(tiles, causal_mod, block_size=64) if hasattr(BlockMask, "from_dense") else None
            if mask is None:
                from torch.nn.attention.flex_attention import create_block_mask

                mask = create_block_mask(lambda b, h, i, j: tiles[b, h, i // 64, j // 64] & (j <= i), 1, q.shape[1], n, n, device="cpu")
            variants[f"flex eager ({args.flex_recipe})"] = lambda: flex_attention(qr, keys, values, block_mask=mask, scale=ctx.scaling)
            try:
                compiled = torch.compile(flex_attention)
                compiled(qr, keys, values, block_mask=mask, scale=ctx.scaling)
                variants[f"flex compiled ({args.flex_recipe})"] = lambda: compiled(qr, keys, values, block_mask=mask, scale=ctx.scaling)
            except Exception as error:  # noqa: BLE001 - reported, not hidden
                print(f"flex compiled: unavailable ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
        times: dict[str, list[float]] = {k: [] for k in variants}
        names = list(variants)
        for r in range(args.repeats):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                start = time.perf_counter()
                variants[name]()
                times[name].append(time.perf_counter() - start)
        base = median(times["dense"])
        print(f"n={n}  load average {os.getloadavg()[0]:.2f}  torch {torch.__version__}  threads {torch.get_num_threads()}")
        for name in names:
            t = median(times[name])
            share = f"{density[name]:.3f}" if name in density else "  -  "
            print(f"  {name:38s} {t:8.3f} s   x{base / t:5.2f} vs dense   pairs {share}")


if __name__ == "__main__":
    main()

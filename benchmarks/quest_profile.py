"""Decode-step cost of ``quest`` vs ``full`` on the default model, side by side, and what
dominates the step (torch.profiler).

The cache is filled with random keys and values (the model is not run over the context:
timing depends only on shapes), then decoding steps alternate between the two recipes on the
same cache so that load changes hit both alike. Writes a markdown table.

    python benchmarks/quest_profile.py --lengths 4k,8k,16k --steps 8
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import kvlab
from kvlab.engine.forward import Phase
from kvlab.recipe import parse_recipe


def filled(engine, recipe: str, n: int):
    sequence = engine.new_sequence(recipe)
    engine.prefill(sequence, [1] * 8, compress=True, progress=False)
    g = torch.Generator().manual_seed(0)
    for layer in sequence.cache.layers:
        b, h, _, d = layer.keys.shape
        k = torch.randn(b, h, n - 8, d, generator=g, dtype=layer.keys.dtype)
        layer.append(k, torch.randn(k.shape, generator=g, dtype=k.dtype), torch.arange(8, n))
    return sequence


def step(engine, sequence, recipe) -> float:
    sequence.recipe = recipe
    start = time.perf_counter()
    engine.forward(sequence, [1], Phase.DECODE)
    return time.perf_counter() - start


def categories(prof) -> dict[str, float]:
    """Self CPU time (ms) by kind: weight matmuls, attention, selection, the rest."""
    out = {"weight matmuls (linear/lm head)": 0.0, "attention (sdpa)": 0.0,
           "quest selection/gather": 0.0, "other ops": 0.0}
    for e in prof.key_averages():
        name, t = e.key, e.self_cpu_time_total / 1000
        if name in ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul") and e.count < 10_000:
            out["weight matmuls (linear/lm head)" if e.key != "aten::matmul" else "other ops"] += t
        elif "scaled_dot_product" in name or "flash_attention" in name or "_efficient_attention" in name:
            out["attention (sdpa)"] += t
        elif name in ("aten::topk", "aten::index", "aten::clamp", "aten::bmm", "aten::amin",
                      "aten::amax", "aten::cat", "aten::eq", "aten::any"):
            out["quest selection/gather"] += t
        else:
            out["other ops"] += t
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="4k,8k,16k")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--recipe", default="quest(budget=0.125)")
    parser.add_argument("--out", default="benchmarks/results/quest_profile.md")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = kvlab.load(progress=False)
    full, quest = parse_recipe("full"), parse_recipe(args.recipe)
    load = [os.getloadavg()[0]]
    lines = [f"| length | full (ms/step) | `{args.recipe}` (ms/step) | ratio |", "|---:|---:|---:|---:|"]
    profiles = {}
    for text in args.lengths.split(","):
        n = int(float(text.rstrip("k")) * 1024) if text.endswith("k") else int(text)
        sequence = filled(engine, args.recipe, n)
        step(engine, sequence, full), step(engine, sequence, quest)  # warm-up
        times = {"full": [], "quest": []}
        for _ in range(args.steps):
            times["full"].append(step(engine, sequence, full))
            times["quest"].append(step(engine, sequence, quest))
        med = {k: sorted(v)[len(v) // 2] * 1000 for k, v in times.items()}
        lines.append(f"| {n} | {med['full']:.1f} | {med['quest']:.1f} | {med['quest'] / med['full']:.2f}x |")
        print(lines[-1], flush=True)
        if text == args.lengths.split(",")[-1]:
            for name, recipe in (("full", full), ("quest", quest)):
                with profile(activities=[ProfilerActivity.CPU]) as prof:
                    for _ in range(3):
                        step(engine, sequence, recipe)
                profiles[name] = (n, categories(prof), prof)
        load.append(os.getloadavg()[0])
    lines = [
        f"Measured {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} by benchmarks/quest_profile.py: "
        f"{engine.name} {next(engine.model.parameters()).dtype} on CPU, {torch.get_num_threads()} torch threads, "
        f"random cache, decode steps interleaved, medians of {args.steps}; load average "
        f"{' -> '.join(f'{x:.2f}' for x in load)}.", "", *lines, "",
    ]
    for name, (n, cats, prof) in profiles.items():
        total = sum(cats.values())
        lines += [f"torch.profiler, `{name}` at {n} entries, 3 steps, self CPU time:", "",
                  "| part | ms | share |", "|---|---:|---:|"]
        lines += [f"| {k} | {v:.1f} | {v / total:.0%} |" for k, v in cats.items()]
        lines += ["", "```", prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), "```", ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

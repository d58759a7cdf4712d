#!/usr/bin/env python
"""Time vs context length: kvlab recipes, kvlab ``full`` and plain transformers, in one run.

For each context length, every variant is measured on the same prompt, interleaved (the order
rotates with each repeat, so all see the same machine load):

- ``transformers``: the same model and dtype loaded by transformers with its SDPA attention and
  its ``DynamicCache``: one forward over the prompt, then one forward per decoding step, the
  loop ``generate`` runs (without its sampling machinery, and with the same forced tokens as
  the other variants) — the floor of kvlab's engine overhead;
- ``full`` and each recipe, through kvlab's engine: ``Engine.prefill`` of the prompt (compressed
  at its end), then decoding steps teacher-forced with the same token ids (so every variant runs
  exactly ``--new-tokens`` steps).

Measured, in the same run: the machine's memory bandwidth (a large tensor copy: bytes read +
written / seconds) and matmul throughput (square fp32 matmuls: FLOPs / seconds). They give each
variant a **physical limit**: a decoding step cannot take less than (weight bytes + KV bytes
held) / bandwidth, a prefill less than (matmul FLOPs of the linear layers + of the computed
attention) / matmul FLOP/s. The limits are bounds computed from measured rates and measured
bytes, labelled as bounds; every time is a wall-clock measurement.

    python benchmarks/speed.py                                  # 1k, 2k, 4k; the default recipes
    python benchmarks/speed.py --lengths 1k,2k,4k,8k --new-tokens 32 --repeats 2
    python benchmarks/speed.py --recipes "snapkv(budget=0.125); quest(budget=0.125)"

Writes ``benchmarks/results/speed.json`` (every measurement and the machine's load), ``.md``
(the table) and ``.png`` (time vs length, log-log, per variant, with the limit lines).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kvlab  # noqa: E402
from kvlab.bench.lengths import format_length, parse_length  # noqa: E402
from kvlab.corpus import prose_text  # noqa: E402
from kvlab.engine.sampling import Sampling  # noqa: E402

DEFAULT_RECIPES = ("snapkv(budget=0.125)", "quest(budget=0.125)", "ashape(sink=4, window=512)")
OUT = ROOT / "benchmarks" / "results" / "speed"


# -- the machine's rates ---------------------------------------------------------------------------
def memory_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy (read + write), the best of ``repeats``."""
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def matmul_flops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of ``n x n`` matmuls (2 n^3 FLOPs each), the best of ``repeats``."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


# -- the model's work ------------------------------------------------------------------------------
def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters one decoding step reads (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def prefill_flops(config: Any, tokens: int, attended: float) -> float:
    """Matmul FLOPs of a prefill of ``tokens``: the linear layers (2 x params x tokens) plus the
    attention scores and weighted values (4 x head_dim x heads x layers x ``attended``, the
    query-key pairs computed: n(n+1)/2 when dense and causal)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    per_layer = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2 + 3 * d * config.intermediate_size
    linear = 2 * tokens * (per_layer * layers + d * config.vocab_size / tokens)  # lm head: last token
    return linear + 4 * head_dim * heads * layers * attended


def attended_pairs(recipe: str, tokens: int) -> float:
    """Query-key pairs a recipe's prefill computes: dense causal, or A-shape's sinks + window."""
    parsed = kvlab.parse_recipe(recipe) if recipe not in ("transformers", "full") else None
    prefill = parsed.prefill if parsed is not None else None
    if prefill is not None and prefill.name == "ashape":
        band = prefill.sink + prefill.window
        return tokens * min(tokens, band)
    return tokens * (tokens + 1) / 2


# -- one measurement -------------------------------------------------------------------------------
def prompt_ids(tokenizer: Any, tokens: int) -> list[int]:
    text = prose_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < tokens:
        ids = ids + ids
    return ids[:tokens]


def run_kvlab(engine: kvlab.Engine, recipe: str, ids: list[int], forced: list[int]) -> dict[str, Any]:
    sequence = engine.new_sequence(recipe if recipe != "full" else None)
    start = time.perf_counter()
    logits = engine.prefill(sequence, ids, compress=True, progress=False)
    prefill_s = time.perf_counter() - start
    kv_bytes = sequence.nbytes()
    start = time.perf_counter()
    engine.teacher_force(sequence, logits, forced + [forced[-1]])  # len(forced) decoding steps
    decode_s = time.perf_counter() - start
    return {"prefill_s": prefill_s, "decode_ms_per_token": 1000 * decode_s / len(forced),
            "kv_bytes": kv_bytes}


@torch.inference_mode()
def run_transformers(model: Any, ids: list[int], forced: list[int]) -> dict[str, Any]:
    """transformers' own loop: one forward over the prompt (a fresh ``DynamicCache``), then one
    forward per forced token on that cache — what ``generate`` runs, without its sampling
    machinery, so it is the floor of any engine on this model."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    start = time.perf_counter()
    model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=1)
    prefill_s = time.perf_counter() - start
    kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    start = time.perf_counter()
    for token in forced:
        model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True, logits_to_keep=1)
    decode_s = time.perf_counter() - start
    return {"prefill_s": prefill_s, "decode_ms_per_token": 1000 * decode_s / len(forced),
            "kv_bytes": kv_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="1k,2k,4k", help="context lengths (default: 1k,2k,4k)")
    parser.add_argument("--recipes", default="; ".join(DEFAULT_RECIPES),
                        help=f"recipes besides full, ';'-separated (default: {'; '.join(DEFAULT_RECIPES)})")
    parser.add_argument("--new-tokens", type=int, default=16, help="decoding steps timed (default: 16)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds per length; medians kept (default: 1)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output path stem (default: {OUT.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    try:
        lengths = [parse_length(x) for x in args.lengths.split(",") if x.strip()]
        recipes = [r.strip() for r in args.recipes.split(";") if r.strip()]
        for recipe in recipes:
            kvlab.parse_recipe(recipe)
    except kvlab.KvlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.new_tokens < 1 or args.repeats < 1:
        print("error: --new-tokens and --repeats must be >= 1", file=sys.stderr)
        return 2

    from transformers import AutoModelForCausalLM

    from kvlab.engine.loading import converted_gguf, default_gguf, quiet_loading

    engine = kvlab.load(progress=False)
    directory = converted_gguf(default_gguf(), progress=False)
    with quiet_loading():
        plain = AutoModelForCausalLM.from_pretrained(
            directory, dtype=torch.float32, attn_implementation="sdpa", local_files_only=True
        ).eval()
    tokenizer = engine.tokenizer
    bandwidth, flops = memory_bandwidth(), matmul_flops()
    weights = weight_bytes(engine.model)
    variants = ["transformers", "full", *recipes]
    load_start = os.getloadavg()
    print(f"memory bandwidth {bandwidth / 1e9:.1f} GB/s, matmul {flops / 1e9:.1f} GFLOP/s, "
          f"weights {weights / 2**20:.0f} MiB, torch threads {torch.get_num_threads()}, "
          f"load average {load_start[0]:.2f}", flush=True)
    warm = prompt_ids(tokenizer, 64)
    for variant in variants:  # one short untimed run each: first-call costs stay out of the table
        if variant == "transformers":
            run_transformers(plain, warm, warm[:1])
        else:
            run_kvlab(engine, variant, warm, warm[:1])
    measured: list[dict[str, Any]] = []
    for length in lengths:
        ids = prompt_ids(tokenizer, length - args.new_tokens - 1)
        forced = prompt_ids(tokenizer, args.new_tokens + 7)[7:]
        for repeat in range(args.repeats):
            order = variants[repeat % len(variants):] + variants[: repeat % len(variants)]
            for variant in order:
                if variant == "transformers":
                    row = run_transformers(plain, ids, forced)
                else:
                    row = run_kvlab(engine, variant, ids, forced)
                row.update(variant=variant, length=length, repeat=repeat)
                measured.append(row)
                print(f"{format_length(length):>5} {variant:<32} prefill {row['prefill_s']:7.3f} s"
                      f"   decode {row['decode_ms_per_token']:8.1f} ms/token"
                      f"   KV {row['kv_bytes'] / 2**20:7.1f} MiB", flush=True)
    rows = summarise(measured, engine.config, bandwidth, flops, weights, variants, lengths)
    record = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_average_start": load_start,
                    "load_average_end": os.getloadavg()},
        "versions": {"kvlab": kvlab.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "model": engine.name, "dtype": "float32", "new_tokens": args.new_tokens,
        "memory_bandwidth_bytes_per_s": bandwidth, "matmul_flops_per_s": flops,
        "weight_bytes": weights, "measurements": measured, "summary": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    table = markdown(rows, record)
    args.out.with_suffix(".md").write_text(table)
    plot(rows, variants, args.out.with_suffix(".png"))
    print(table)
    print(f"wrote {args.out.with_suffix('.json')}, .md, .png")
    return 0


def summarise(measured: list[dict[str, Any]], config: Any, bandwidth: float, flops: float,
              weights: int, variants: list[str], lengths: list[int]) -> list[dict[str, Any]]:
    """Medians per (variant, length), ratios to kvlab full and to transformers, and limits."""
    rows = []
    for length in lengths:
        base = {}
        for variant in variants:
            picked = [m for m in measured if m["variant"] == variant and m["length"] == length]
            prefill = median(m["prefill_s"] for m in picked)
            decode = median(m["decode_ms_per_token"] for m in picked)
            kv = median(m["kv_bytes"] for m in picked)
            base[variant] = (prefill, decode)
            rows.append({
                "variant": variant, "length": length, "n": len(picked), "prefill_s": prefill,
                "decode_ms_per_token": decode, "kv_bytes": kv,
                "prefill_limit_s": prefill_flops(config, length, attended_pairs(variant, length)) / flops,
                "decode_limit_ms_per_token": 1000 * (weights + kv) / bandwidth,
            })
        for row in rows:
            if row["length"] == length:
                full, plain = base["full"], base["transformers"]
                row["prefill_vs_full"] = row["prefill_s"] / full[0]
                row["decode_vs_full"] = row["decode_ms_per_token"] / full[1]
                row["prefill_vs_transformers"] = row["prefill_s"] / plain[0]
                row["decode_vs_transformers"] = row["decode_ms_per_token"] / plain[1]
    return rows


def markdown(rows: list[dict[str, Any]], record: dict[str, Any]) -> str:
    head = (
        f"Measured {record['date']}: {record['model']} float32 on {record['machine']['cpus']} CPUs "
        f"({record['machine']['torch_threads']} torch threads), load average "
        f"{record['machine']['load_average_start'][0]:.2f} -> {record['machine']['load_average_end'][0]:.2f}; "
        f"memory bandwidth {record['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, matmul "
        f"{record['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s (both measured in the run); "
        f"{record['new_tokens']} decoding steps timed per variant.\n\n"
    )
    lines = [
        "| length | variant | prefill (s) | vs full | vs transformers | prefill bound (s) "
        "| decode (ms/token) | vs full | vs transformers | decode bound (ms/token) | KV (MiB) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {format_length(r['length'])} | `{r['variant']}` | {r['prefill_s']:.3f} | "
            f"{r['prefill_vs_full']:.2f}x | {r['prefill_vs_transformers']:.2f}x | {r['prefill_limit_s']:.3f} | "
            f"{r['decode_ms_per_token']:.1f} | {r['decode_vs_full']:.2f}x | {r['decode_vs_transformers']:.2f}x | "
            f"{r['decode_limit_ms_per_token']:.2f} | {r['kv_bytes'] / 2**20:.1f} |"
        )
    return head + "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], variants: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, variant in enumerate(variants):
        mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["length"])
        x = [r["length"] for r in mine]
        colour = colours[i % len(colours)]
        axes[0].plot(x, [r["prefill_s"] for r in mine], "o-", color=colour, label=variant)
        axes[0].plot(x, [r["prefill_limit_s"] for r in mine], ":", color=colour, linewidth=1)
        axes[1].plot(x, [r["decode_ms_per_token"] for r in mine], "o-", color=colour, label=variant)
        axes[1].plot(x, [r["decode_limit_ms_per_token"] for r in mine], ":", color=colour, linewidth=1)
    for ax, title, unit in ((axes[0], "prefill", "seconds"), (axes[1], "decode", "ms per token")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        lengths = sorted({r["length"] for r in rows})
        ax.set_xticks(lengths, [format_length(n) for n in lengths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(unit)
        ax.set_title(f"{title}\n(dotted: physical bound from measured rates)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

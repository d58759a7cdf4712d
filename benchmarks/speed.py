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

Past the model's window (``--window``, default its trained length: 8k for the default model),
the kvlab variants get a position method added, YaRN with the smallest power-of-two factor that
reaches the length (``yarn(factor=2)`` at 16k, ``yarn(factor=4)`` at 32k; a recipe with its own
position method keeps it), and plain transformers the same YaRN through
``config.rope_parameters``; the output says so.

    python benchmarks/speed.py --lengths 16k --new-tokens 4         # yarn(factor=2) added
    python benchmarks/speed.py --device cuda --dtype bfloat16 --lengths 4k,8k,16k,32k

Writes ``benchmarks/results/speed.json`` (every measurement and the machine's load), ``.md``
(the table) and ``.png`` (time vs length, log-log, per variant, with the limit lines), and adds
one row per measurement to the ``speed`` table of ``--store DIR``'s ``results.duckdb``
(default ``benchmarks/results/speed-store``): ``kvlab report DIR`` draws its "Time vs length"
section (:mod:`kvlab.bench.timing`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import kvlab  # noqa: E402
from kvlab.bench import timing  # noqa: E402
from kvlab.bench.lengths import format_length, parse_length  # noqa: E402
from kvlab.corpus import prose_text  # noqa: E402
from kvlab.engine.forward import Phase  # noqa: E402

DEFAULT_RECIPES = ("snapkv(budget=0.125)", "quest(budget=0.125)", "ashape(sink=4, window=512)")
OUT = ROOT / "benchmarks" / "results" / "speed"
STORE = ROOT / "benchmarks" / "results" / "speed-store"


# -- the machine's rates ---------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_bandwidth(mib: int = 512, repeats: int = 5, device: torch.device | None = None) -> float:
    """Bytes per second of a large tensor copy (read + write), the best of ``repeats``."""
    device = device or torch.device("cpu")
    src = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / best


def matmul_flops(n: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None) -> float:
    """FLOP/s of ``n x n`` matmuls in ``dtype`` (2 n^3 FLOPs each), the best of ``repeats``."""
    device = device or torch.device("cpu")
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
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


def prefill_flops(config: Any, layer_tokens: list[int], context: int,
                  layer_pairs: list[int] | None = None) -> float:
    """Matmul FLOPs of a prefill of a ``context``-token prompt, layer by layer, from the work
    each layer really did, as kvlab's engine counted it: the tokens it ran
    (``Stats.prefilled_per_layer``: fewer than ``context`` in the later layers of a
    token-selective prefill, FastKV; more in GemFilter's early layers, which run the context
    once to select and the kept tokens again) and the query-key pairs its attention computed
    (``Stats.attended_pairs_per_layer``, summed over query heads: a sparse pattern's band or
    tiles, not the dense triangle). A layer's linear work is 2 x its params x its tokens, its
    attention work 4 x head_dim x its pairs. Without counts (plain transformers) every layer ran
    the prompt densely: ``heads x n (n + 1) / 2`` pairs. The lm head runs on the last token."""
    d, layers = config.hidden_size, config.num_hidden_layers
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    per_layer = d * heads * head_dim * 2 + d * kv_heads * head_dim * 2 + 3 * d * config.intermediate_size
    if len(layer_tokens) != layers or not layer_pairs or len(layer_pairs) != layers:
        layer_tokens = [context] * layers
        layer_pairs = [heads * context * (context + 1) // 2] * layers
    total = 2 * d * config.vocab_size
    for tokens, pairs in zip(layer_tokens, layer_pairs):
        total += 2 * per_layer * tokens + 4 * head_dim * pairs
    return total


# -- one measurement -------------------------------------------------------------------------------
def attended_share(config: Any, row: dict[str, Any], context: int) -> float | None:
    """The share of the dense causal query-key pairs a kvlab prefill computed (1.0 when dense;
    a sparse pattern's density), from the engine's counts; None without counts."""
    pairs = row.get("layer_pairs")
    if not pairs:
        return None
    dense = config.num_attention_heads * context * (context + 1) / 2 * len(pairs)
    return sum(pairs) / dense


def prompt_ids(tokenizer: Any, tokens: int) -> list[int]:
    text = prose_text()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < tokens:
        ids = ids + ids
    return ids[:tokens]


PROFILE_PARTS = ("weight matmuls", "attention", "selection and gathers", "other ops")


def decode_profile(step: Any) -> dict[str, float]:
    """Self CPU milliseconds of one decoding step (``step()``) by part, from torch.profiler:
    the weight matmuls (``mm``/``addmm`` on 2-D weights: linear layers and the lm head), the
    attention kernels (SDPA, the one-query matmuls, softmax), selection and gathers (topk,
    index_select, gather, sort, scatter, cat, the comparisons of a selection), other ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        step()
    parts = dict.fromkeys(PROFILE_PARTS, 0.0)
    selection = ("topk", "index_select", "gather", "sort", "scatter", "cat", "index", "take",
                 "masked_select", "nonzero", "searchsorted", "repeat_interleave", "eq", "any",
                 "where", "clamp", "amin", "amax", "cumsum")
    for event in prof.key_averages(group_by_input_shape=True):
        name, ms = event.key.removeprefix("aten::"), event.self_cpu_time_total / 1000
        shapes = event.input_shapes or []
        weight = len(shapes) > 1 and len(shapes[1]) == 2 and name in ("mm", "addmm", "linear")
        if weight or (name == "addmm" and len(shapes) > 2 and len(shapes[2]) == 2):
            parts["weight matmuls"] += ms
        elif "attention" in name or name in ("bmm", "matmul", "_softmax", "softmax", "baddbmm"):
            parts["attention"] += ms
        elif name in selection or name.startswith(selection):
            parts["selection and gathers"] += ms
        else:
            parts["other ops"] += ms
    return parts


def decodes_only(recipe: str) -> bool:
    """``recipe`` is a retrieve method alone (a position method besides allowed) that acts only
    while decoding: it observes no prefill chunk, builds nothing at the end of the context and
    leaves the prompt's attention dense, so its prefill is exactly ``full``'s."""
    from kvlab.retrieve.base import RetrieveMethod

    parsed = kvlab.parse_recipe(recipe)
    method = parsed.retrieve
    if method is None or any(getattr(parsed, s) is not None for s in ("prefill", "compress", "quantize")):
        return False
    cls = type(method)
    prefill_free = cls.attend_prefill is RetrieveMethod.attend_prefill or not getattr(method, "prefill_chunks", True)
    return (cls.end_context is RetrieveMethod.end_context and cls.observe is RetrieveMethod.observe
            and cls.attend_appended is RetrieveMethod.attend_appended and prefill_free)


def decode_on_full(engine: kvlab.Engine, full: dict[str, Any], recipe: str, forced: list[int],
                   profile: bool = False, warmup: list[int] = ()) -> dict[str, Any]:
    """Time ``recipe``'s decoding steps on ``full``'s prefilled cache (a :func:`decodes_only`
    recipe: its own prefill would compute exactly ``full``'s), then roll the cache back. Its
    prefill columns are ``full``'s measurement (``prefill_from``: full)."""
    base, mark = full["sequence"], full["mark"]
    sequence = engine.new_sequence(recipe)  # the recipe's prepared work (e.g. Lychee's head split)
    sequence.cache = base.cache
    sequence.layer_tokens, sequence.layer_pairs = list(base.layer_tokens), list(base.layer_pairs)
    try:
        for layer in sequence.layers:
            layer.side.clear()  # no index of full's decoding is kept
        logits = full["logits"]
        for token in warmup:
            logits = engine.forward(sequence, [token], Phase.DECODE)
        _sync(engine.device)
        start = time.perf_counter()
        engine.teacher_force(sequence, logits, forced + [forced[-1]])
        _sync(engine.device)
        decode_s = time.perf_counter() - start
        kv_bytes = sequence.nbytes()
        profiled = None
        if profile:
            profiled = decode_profile(lambda: engine.forward(sequence, [forced[-1]], Phase.DECODE))
    finally:
        base.rollback(mark)
        for layer in base.layers:
            layer.side.clear()
    return {"decode_profile_ms": profiled, "prefill_s": full["prefill_s"], "prefill_from": "full",
            "decode_ms_per_token": 1000 * decode_s / len(forced), "kv_bytes": kv_bytes,
            "layer_tokens": list(base.layer_tokens), "layer_pairs": list(base.layer_pairs)}


def run_kvlab(engine: kvlab.Engine, recipe: str, ids: list[int], forced: list[int],
              profile: bool = False, keep: bool = False, warmup: list[int] = ()) -> dict[str, Any]:
    """Prefill ``ids`` with ``recipe`` (timed), then ``len(forced)`` teacher-forced decoding
    steps (timed). With ``keep``, the row also carries the sequence rolled back to its
    prefilled state, its mark and the prefill's logits, for :func:`decode_on_full`."""
    sequence = engine.new_sequence(recipe if recipe != "full" else None)
    _sync(engine.device)
    start = time.perf_counter()
    logits = engine.prefill(sequence, ids, compress=True, progress=False)
    _sync(engine.device)
    prefill_s = time.perf_counter() - start
    layer_tokens = list(sequence.layer_tokens)  # the prefill's, before decoding adds to them
    layer_pairs = list(sequence.layer_pairs)
    mark = sequence.mark() if keep else None
    first = logits
    for token in warmup:  # untimed steps first: the timed ones are steady (indexes built lazily)
        logits = engine.forward(sequence, [token], Phase.DECODE)
    start = time.perf_counter()
    engine.teacher_force(sequence, logits, forced + [forced[-1]])  # len(forced) decoding steps
    _sync(engine.device)
    decode_s = time.perf_counter() - start
    kv_bytes = sequence.nbytes()  # after decoding: with any index built then (Quest's bounds)
    profiled = None
    if profile:  # one more step, untimed: where its time goes
        profiled = decode_profile(lambda: engine.forward(sequence, [forced[-1]], Phase.DECODE))
    row = {"decode_profile_ms": profiled, "prefill_s": prefill_s, "decode_ms_per_token": 1000 * decode_s / len(forced),
           "kv_bytes": kv_bytes, "layer_tokens": layer_tokens, "layer_pairs": layer_pairs}
    if keep:
        sequence.rollback(mark)
        row.update(sequence=sequence, mark=mark, logits=first)
    return row


@torch.inference_mode()
def run_transformers(model: Any, ids: list[int], forced: list[int], profile: bool = False,
                     warmup: list[int] = ()) -> dict[str, Any]:
    """transformers' own loop: one forward over the prompt (a fresh ``DynamicCache``), then one
    forward per forced token on that cache — what ``generate`` runs, without its sampling
    machinery, so it is the floor of any engine on this model."""
    from transformers import DynamicCache

    device = model.device
    cache = DynamicCache(config=model.config)
    _sync(device)
    start = time.perf_counter()
    model(input_ids=torch.tensor([ids], device=device), cache=cache, use_cache=True, logits_to_keep=1)
    _sync(device)
    prefill_s = time.perf_counter() - start
    for token in warmup:
        model(input_ids=torch.tensor([[token]], device=device), cache=cache, use_cache=True, logits_to_keep=1)
    start = time.perf_counter()
    for token in forced:
        model(input_ids=torch.tensor([[token]], device=device), cache=cache, use_cache=True,
              logits_to_keep=1)
    _sync(device)
    decode_s = time.perf_counter() - start
    kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    profiled = None
    if profile:
        profiled = decode_profile(lambda: model(input_ids=torch.tensor([[forced[-1]]], device=device),
                                                cache=cache, use_cache=True, logits_to_keep=1))
    return {"decode_profile_ms": profiled, "prefill_s": prefill_s, "decode_ms_per_token": 1000 * decode_s / len(forced),
            "kv_bytes": kv_bytes}


def profile_markdown(rows: list[dict[str, Any]]) -> str:
    """Where one decoding step's time goes, per length and variant (self CPU ms by part)."""
    lines = ["One decoding step profiled per variant (torch.profiler, self CPU ms; untimed "
             "step after the timed ones):", "",
             "| length | variant | " + " | ".join(PROFILE_PARTS) + " | total |",
             "|---:|---|" + "---:|" * (len(PROFILE_PARTS) + 1)]
    for row in rows:
        parts = row.get("decode_profile_ms")
        if not parts or row.get("repeat_index", 0):
            continue
        lines.append(f"| {format_length(row['context_length'])} | `{row['variant']}` | "
                     + " | ".join(f"{parts[p]:.1f}" for p in PROFILE_PARTS)
                     + f" | {sum(parts.values()):.1f} |")
    return "\n".join(lines)


def position_for(length: int, window: int) -> str | None:
    """The position method a recipe needs at ``length`` past the model's ``window``: YaRN with
    the smallest power-of-two factor that reaches it (None within the window)."""
    if length <= window:
        return None
    factor = 2
    while window * factor < length:
        factor *= 2
    return f"yarn(factor={factor})"


def with_position(recipe: str, position: str | None) -> str:
    """``recipe`` with ``position`` added (a recipe that has its own position method keeps it)."""
    if position is None:
        return recipe
    if recipe == "full":
        return position
    if kvlab.parse_recipe(recipe).position is not None:
        return recipe
    return f"{recipe} + {position}"


def plain_rope(plain: Any, position: str | None, original: dict[str, Any]) -> None:
    """Give plain transformers the rope parameters of ``position`` (its YaRN through
    ``config.rope_parameters``, as kvlab's position method defines them), or its own."""
    config = plain.config
    params = dict(original)
    if position is not None:
        params.update(kvlab.parse_recipe(position).position.rope_parameters(config))
    if params != config.rope_parameters:
        config.rope_parameters = params
        rotary = plain.model.rotary_emb
        plain.model.rotary_emb = type(rotary)(config).to(rotary.inv_freq.device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="1k,2k,4k", help="context lengths (default: 1k,2k,4k)")
    parser.add_argument("--recipes", default="; ".join(DEFAULT_RECIPES),
                        help=f"recipes besides full, ';'-separated (default: {'; '.join(DEFAULT_RECIPES)})")
    parser.add_argument("--new-tokens", type=int, default=16, help="decoding steps timed (default: 16)")
    parser.add_argument("--repeats", type=int, default=1, help="rounds per length; medians kept (default: 1)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--dtype", default="auto",
                        help="auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16 or float16 "
                             "(CUDA only) (default: auto)")
    parser.add_argument("--window", type=int, default=None,
                        help="treat the model's window as this many tokens (default: its trained "
                             "length); past it kvlab variants get a position method added")
    parser.add_argument("--no-transformers", action="store_true",
                        help="skip the plain transformers variant")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more decoding step per variant (torch.profiler, untimed): "
                             "where its time goes, in the .json and a second table in the .md")
    parser.add_argument("--on-full", default="",
                        help="retrieve recipes that act only while decoding (';'-separated): their "
                             "decoding is timed on full's prefilled cache right after full, their "
                             "prefill columns are full's (it is the same computation)")
    parser.add_argument("--decode-warmup", type=int, default=0,
                        help="untimed decoding steps before the timed ones, for every variant "
                             "(steady time per token: a retrieve method's index built at its first "
                             "step, the storage's first growth left out) (default: 0)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"output path stem (default: {OUT.relative_to(ROOT)})")
    parser.add_argument("--store", type=Path, default=STORE,
                        help="results directory: the rows go to its results.duckdb, table speed, and "
                             f"`kvlab report DIR` draws them (default: {STORE.relative_to(ROOT)})")
    args = parser.parse_args(argv)
    from kvlab.engine.loading import resolve_device, resolve_dtype

    try:
        lengths = [parse_length(x) for x in args.lengths.split(",") if x.strip()]
        recipes = [r.strip() for r in args.recipes.split(";") if r.strip()]
        on_full = [r.strip() for r in args.on_full.split(";") if r.strip()]
        for recipe in recipes + on_full:
            kvlab.parse_recipe(recipe)
        for recipe in on_full:
            if not decodes_only(recipe):
                raise kvlab.RecipeError(
                    f"--on-full {recipe!r}: only a retrieve method that acts while decoding alone "
                    "(no prefill, compress or quantize method, no index built from the context) "
                    "shares full's prefill; give it with --recipes")
        device = resolve_device(args.device)
        dtype = resolve_dtype(args.dtype, device)
    except kvlab.KvlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.new_tokens < 1 or args.repeats < 1:
        print("error: --new-tokens and --repeats must be >= 1", file=sys.stderr)
        return 2

    from transformers import AutoModelForCausalLM

    from kvlab.bench.store import ResultStore
    from kvlab.engine.loading import converted_gguf, default_gguf, quiet_loading

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype_name = str(dtype).removeprefix("torch.")
    try:
        store = ResultStore(args.store)
    except kvlab.KvlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine = kvlab.load(device=str(device), dtype=dtype_name, progress=False)
    window = args.window or engine.trained_length
    plain = None
    if not args.no_transformers:
        directory = converted_gguf(default_gguf(), progress=False)
        with quiet_loading():
            plain = AutoModelForCausalLM.from_pretrained(
                directory, dtype=dtype, attn_implementation="sdpa", local_files_only=True
            ).eval().to(device)
        plain_params = dict(plain.config.rope_parameters or {})
    tokenizer = engine.tokenizer
    bandwidth, flops = memory_bandwidth(device=device), matmul_flops(device=device, dtype=dtype)
    weights = weight_bytes(engine.model)
    variants = (["transformers"] if plain is not None else []) + ["full", *recipes, *on_full]
    load_start = os.getloadavg()
    started = dt.datetime.now().astimezone()
    run_id = f"{started.isoformat(timespec='seconds')} {platform.node()}"
    print(f"run {run_id}: {engine.name} {dtype_name} on {device}; memory bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s, matmul {flops / 1e9:.1f} GFLOP/s, weights "
          f"{weights / 2**20:.0f} MiB, torch threads {torch.get_num_threads()}, "
          f"load average {load_start[0]:.2f}; window {window} tokens", flush=True)
    warm = prompt_ids(tokenizer, 64)
    for variant in variants:  # one short untimed run each: first-call costs stay out of the table
        if variant == "transformers":
            run_transformers(plain, warm, warm[:1])
        else:
            run_kvlab(engine, variant, warm, warm[:1])
    measured: list[dict[str, Any]] = []
    for length in lengths:
        position = position_for(length, window)
        if position is not None:
            print(f"{format_length(length)} is past the {window}-token window: kvlab variants run "
                  f"with {position} added; transformers with the same YaRN rope parameters "
                  "(config.rope_parameters)", flush=True)
        if plain is not None:
            plain_rope(plain, position, plain_params)
        ids = prompt_ids(tokenizer, length - args.new_tokens - args.decode_warmup - 1)
        forced = prompt_ids(tokenizer, args.new_tokens + args.decode_warmup + 7)[7:]
        warmup, forced = forced[: args.decode_warmup], forced[args.decode_warmup:]
        rows = []
        for repeat in range(args.repeats):
            order = variants[repeat % len(variants):] + variants[: repeat % len(variants)]
            for variant in order:
                recipe = None if variant == "transformers" else with_position(variant, position)
                if recipe is None:
                    measured_rows = [(variant, recipe, run_transformers(plain, ids, forced, args.profile, warmup))]
                elif variant == "full" and on_full:
                    row = run_kvlab(engine, recipe, ids, forced, args.profile, keep=True, warmup=warmup)
                    measured_rows = [(variant, recipe, row)] + [
                        (other, with_position(other, position),
                         decode_on_full(engine, row, with_position(other, position), forced, args.profile,
                                        warmup))
                        for other in on_full
                    ]
                    for key in ("sequence", "mark", "logits"):
                        row.pop(key)
                elif variant in on_full:
                    continue  # timed on full's cache, right after full
                else:
                    measured_rows = [(variant, recipe, run_kvlab(engine, recipe, ids, forced, args.profile,
                                                                 warmup=warmup))]
                for name, run_recipe, row in measured_rows:
                    share = attended_share(engine.config, row, len(ids))
                    work = prefill_flops(engine.config, row.pop("layer_tokens", []), len(ids),
                                         row.pop("layer_pairs", None))
                    row.update(
                        run_id=run_id, model=engine.name, device=str(device), dtype=dtype_name,
                        threads=torch.get_num_threads(), context_length=length, variant=name,
                        recipe=run_recipe, position=position, repeat_index=repeat,
                        new_tokens=args.new_tokens, prefill_flops=work, prefill_bound_s=work / flops,
                        decode_bound_ms_per_token=1000 * (weights + row["kv_bytes"]) / bandwidth,
                        weight_bytes=weights, memory_bandwidth_bytes_per_s=bandwidth,
                        matmul_flops_per_s=flops, load_average=os.getloadavg()[0],
                        attended_share=share,
                    )
                    rows.append(row)
                    shared = " (full's)" if row.get("prefill_from") else ""
                    print(f"{format_length(length):>5} {run_recipe or name:<40} prefill {row['prefill_s']:7.3f} s{shared}"
                          f"   decode {row['decode_ms_per_token']:8.1f} ms/token"
                          f"   KV {row['kv_bytes'] / 2**20:7.1f} MiB   load {row['load_average']:.2f}",
                          flush=True)
        store.add_speed(rows)  # one length at a time: an interrupted run keeps what it measured
        measured += rows
    store.close()
    summary = timing.summarise(measured)
    record = {
        "date": started.isoformat(timespec="seconds"), "run_id": run_id,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_average_start": load_start,
                    "load_average_end": os.getloadavg()},
        "versions": {"kvlab": kvlab.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "model": engine.name, "device": str(device), "dtype": dtype_name, "window": window,
        "new_tokens": args.new_tokens, "memory_bandwidth_bytes_per_s": bandwidth,
        "matmul_flops_per_s": flops, "weight_bytes": weights, "measurements": measured,
        "summary": summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    text = textwrap.fill(f"Measured {record['date']}: {timing.describe(measured)}", 80)
    added = timing.positions_added(measured)
    if added:
        text += "\n\n" + textwrap.fill(
            f"Past the {window}-token window, position method added: {added}.", 80)
    table = text + "\n\n" + timing.markdown(summary)
    if args.profile:
        table += "\n\n" + profile_markdown(measured)
    args.out.with_suffix(".md").write_text(table)
    fig = timing.time_figure(summary)
    fig.savefig(args.out.with_suffix(".png"), dpi=110, facecolor="white")
    print(table)
    print(f"wrote {args.out.with_suffix('.json')}, .md, .png and the speed table of "
          f"{args.store / 'results.duckdb'} (render: kvlab report {args.store})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The ``kvlab`` command line: ``kvlab methods``, ``ask``, ``bench``, ``report``, ``serve``, ``cache``, ``calibrate``, ``tasks``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    help="kvlab: long-context inference methods on one engine, measured the same way.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True, soft_wrap=True)


def _fail(message: str) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code=2)


@app.command()
def methods(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List every method with its stage, parameters (defaults) and paper."""
    import kvlab

    infos = kvlab.methods()
    if as_json:
        print(json.dumps([i.as_dict() for i in infos], indent=2, default=str))
        return
    table = Table(title="kvlab methods (parameter help: kvlab methods --json)", show_lines=True)
    for column in ("stage", "method", "parameters (default)", "paper"):
        table.add_column(column)
    for info in infos:
        params = "\n".join(f"{p.name}={p.default!r}" for p in info.params)
        table.add_row(info.stage, f"[bold]{info.name}[/]\n{info.summary}", params or "-", info.paper)
    out.print(table)


@app.command()
def ask(
    context_file: Annotated[Path, typer.Option(help="Text file holding the shared context.")],
    question: Annotated[list[str], typer.Option(help="A question; repeat for several.")],
    recipe: Annotated[str, typer.Option(help="Recipe, e.g. 'yarn(factor=4) + snapkv(budget=0.25)'.")] = "full",
    model: Annotated[Optional[str], typer.Option(help="Local model dir or .gguf (default: SmolLM2-135M-Instruct).")] = None,
    mode: Annotated[str, typer.Option(help="multi-request or multi-turn.")] = "multi-request",
    answer_prefix: Annotated[str, typer.Option(help="Text the answer starts with.")] = "",
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens generated per answer.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    allow_overflow: Annotated[bool, typer.Option(help="Run past the model's window anyway.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Answer questions about a context file with a recipe; print answers and measured stats."""
    import kvlab

    _check_max_new_tokens(max_new_tokens)
    if not context_file.is_file():
        _fail(f"--context-file {str(context_file)!r} is not a readable file")
    try:
        context = context_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read --context-file {str(context_file)!r}: {exc}")
    try:
        parsed = kvlab.parse_recipe(recipe)
        if mode not in kvlab.reuse.MODES:
            raise kvlab.InputError(f"--mode {mode!r}: must be one of {', '.join(kvlab.reuse.MODES)}")
        with err.status("loading model") if not as_json else _nothing():
            engine = kvlab.load(model, device=device, dtype=dtype, progress=not as_json)
        session = engine.session(context, recipe=parsed, mode=mode, allow_overflow=allow_overflow)
        answers = [
            session.ask(q, answer_prefix=answer_prefix, max_new_tokens=max_new_tokens) for q in question
        ]
    except kvlab.KvlabError as exc:
        _fail(str(exc))
        return
    if as_json:
        payload: dict[str, Any] = {
            "model": engine.name,
            "recipe": str(parsed),
            "mode": mode,
            "context": session.context_stats.as_dict(),
            "answers": [
                {"question": q, "answer": a.text, "stats": a.stats.as_dict()}
                for q, a in zip(question, answers)
            ],
        }
        if len(answers) == 1:
            payload.update(answer=answers[0].text, stats=answers[0].stats.as_dict())
        print(json.dumps(payload, indent=2))
        return
    out.print(f"[dim]model[/] {engine.name}   [dim]recipe[/] {parsed}   [dim]mode[/] {mode}")
    for q, a in zip(question, answers):
        out.print(f"\n[bold]Q:[/] {q}\n[bold green]A:[/] {answer_prefix}{a.text}", highlight=False)
    out.print(_stats_table(session.context_stats, answers))


def _stats_table(context_stats: Any, answers: list[Any]) -> Table:
    """Measured numbers: one column for the context prefill, one per answer."""
    table = Table(title="measured")
    table.add_column("")
    columns = [("context", context_stats)] + [(f"answer {i + 1}", a.stats) for i, a in enumerate(answers)]
    for label, _ in columns:
        table.add_column(label, justify="right")
    rows = [
        ("prompt tokens", lambda s: str(s.prompt_tokens)),
        ("KV entries per layer and head", lambda s: f"{s.kv_tokens:.0f}"),
        ("KV memory (MiB)", lambda s: f"{s.kv_bytes / 2**20:.2f}"),
        ("prefill (s)", lambda s: f"{s.prefill_s:.2f}"),
        ("decode (ms/token)", lambda s: f"{s.decode_s_per_token * 1000:.1f}" if s.new_tokens else "-"),
        ("new tokens", lambda s: str(s.new_tokens)),
    ]
    for name, cell in rows:
        table.add_row(name, *(cell(s) for _, s in columns))
    return table


def _bench_default(name: str) -> str:
    """`` [default: ...]`` for the help of a ``kvlab bench`` option: the effective default,
    from :class:`BenchConfig`'s fields (the options themselves default to None, so that a
    config file's value is kept unless the flag is given)."""
    from rich.markup import escape

    from kvlab.bench.config import default_help

    return escape(f" [default: {default_help(name)}]")


@app.command()
def bench(
    recipes: Annotated[Optional[str], typer.Option(help="Recipes separated by ';' (the reference is always run first)." + _bench_default("recipes"))] = None,
    tasks: Annotated[Optional[str], typer.Option(help="Comma-separated task names (see kvlab tasks)." + _bench_default("tasks"))] = None,
    lengths: Annotated[Optional[str], typer.Option(help="Comma-separated context lengths, e.g. 1k,2k,4k (at most 1024k)." + _bench_default("lengths"))] = None,
    mode: Annotated[Optional[str], typer.Option(help="multi-turn or multi-request." + _bench_default("mode"))] = None,
    samples: Annotated[Optional[int], typer.Option(help="Cases per task and length." + _bench_default("samples"))] = None,
    depths: Annotated[Optional[str], typer.Option(help="Needle depths for needle tasks, e.g. 0.1,0.5,0.9." + _bench_default("depths"))] = None,
    data: Annotated[Optional[list[str]], typer.Option(help="Local JSONL file as PATH:FORMAT (ruler, longbench, scbench), a RULER file optionally PATH:ruler:LENGTH; repeatable." + _bench_default("data"))] = None,
    raw_prompt: Annotated[Optional[bool], typer.Option("--raw-prompt", help="Send RULER --data records as RULER does: input + answer prefix, no chat template." + _bench_default("raw_prompt"))] = None,
    model: Annotated[Optional[str], typer.Option(help="Local model dir or .gguf." + _bench_default("model"))] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N." + _bench_default("device"))] = None,
    dtype: Annotated[Optional[str], typer.Option(help="auto, float32, bfloat16 or float16." + _bench_default("dtype"))] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the generated cases." + _bench_default("seed"))] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option(help="Override each task's answer length (>= 1)." + _bench_default("max_new_tokens"))] = None,
    out: Annotated[Optional[str], typer.Option(help="Results directory (resumable)." + _bench_default("out"))] = None,
    reference: Annotated[Optional[str], typer.Option(help="Recipe the fidelity metrics compare against; runs first on every case." + _bench_default("reference"))] = None,
    allow_overflow: Annotated[Optional[bool], typer.Option("--allow-overflow", help="Run recipes past the model's context window anyway." + _bench_default("allow_overflow"))] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML or TOML file with the same settings (flags override it).")] = None,
    report: Annotated[bool, typer.Option(help="Write the HTML report at the end.")] = True,
) -> None:
    """Benchmark recipes on long-context tasks; with no arguments, the quick suite."""
    import kvlab
    from kvlab.bench.config import BenchConfig, load_config_file, parse_length, split_list
    from kvlab.bench.runner import BenchInterrupted, run_bench

    if max_new_tokens is not None:
        _check_max_new_tokens(max_new_tokens)
    try:
        settings = load_config_file(config) if config else {}
        flags = {
            "recipes": split_list(recipes, ";") if recipes else None,
            "tasks": split_list(tasks) if tasks else None,
            "lengths": [parse_length(x) for x in split_list(lengths)] if lengths else None,
            "mode": mode, "samples": samples, "data": data, "raw_prompt": raw_prompt,
            "model": model, "device": device,
            "dtype": dtype, "seed": seed, "max_new_tokens": max_new_tokens, "out": out,
            "depths": [_float(x, "depth") for x in split_list(depths)] if depths else None,
            "reference": reference, "allow_overflow": allow_overflow or None,  # keeps a file's true
        }
        settings.update({k: v for k, v in flags.items() if v is not None})
        run_bench(BenchConfig(**settings), console=err, report=report)
    except kvlab.KvlabError as exc:
        _fail(str(exc))
    except BenchInterrupted as exc:
        err.print(str(exc), highlight=False)
        raise typer.Exit(code=130) from None
    except KeyboardInterrupt:
        err.print("interrupted before the benchmark started; nothing new was stored")
        raise typer.Exit(code=130) from None


@app.command()
def ppl(
    recipes: Annotated[str, typer.Option(help="Recipes separated by ';'.")] = "full; yarn(factor=2)",
    lengths: Annotated[str, typer.Option(help="Comma-separated document lengths, multiples of the bin (32k: ~4x a 16k document's time).")] = "4k,8k,16k,32k",
    bin: Annotated[int, typer.Option("--bin", help="Tokens per position bin.")] = 1024,
    chunk: Annotated[int, typer.Option(help="Tokens per forward (memory grows with it, never with the length).")] = 1024,
    start: Annotated[int, typer.Option(help="The documents' first token in the shipped prose.")] = 0,
    model: Annotated[Optional[str], typer.Option(help="Local model dir or .gguf (default: SmolLM2-135M-Instruct).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    out: Annotated[str, typer.Option(help="Results directory (resumable; the same store as kvlab bench).")] = "kvlab-results",
    report: Annotated[bool, typer.Option(help="Write the HTML report at the end.")] = True,
) -> None:
    """Perplexity by position: NLL of long public-domain prose per 1k-token bin, per recipe."""
    import kvlab
    from kvlab.bench.config import split_list
    from kvlab.bench.lengths import parse_length
    from kvlab.bench.perplexity import check_lengths, run_perplexity
    from kvlab.bench.report import build_report
    from kvlab.bench.store import ResultStore

    try:
        wanted = [parse_length(x) for x in split_list(lengths)]
        check_lengths(wanted, bin)
        names = split_list(recipes, ";")
        if not names:
            raise kvlab.InputError("--recipes: give at least one recipe, e.g. 'full; yarn(factor=2)'")
        for name in names:
            kvlab.parse_recipe(name)
        engine = kvlab.load(model, device=device, dtype=dtype)
        with ResultStore(out) as store:
            run_perplexity(engine, names, wanted, store, bin_size=bin, chunk=chunk, start=start,
                           say=lambda line: err.print(line, highlight=False))
        if report:
            out_path = build_report(out)
            err.print(f"report: {out_path}", highlight=False)
    except kvlab.KvlabError as exc:
        _fail(str(exc))


@app.command()
def report(
    directory: Annotated[Path, typer.Argument(help="A results directory written by kvlab bench.")],
    output: Annotated[Optional[Path], typer.Option(help="HTML file to write (default: DIR/report.html).")] = None,
    markdown: Annotated[bool, typer.Option(help="Also print the summary as a Markdown table.")] = False,
) -> None:
    """Render the HTML report (plots and tables) of a results directory."""
    from kvlab.bench.report import build_report
    from kvlab.bench.store import DB_NAME, ResultStore
    from kvlab.bench.summary import summary_markdown

    import kvlab

    if not (directory / DB_NAME).is_file():
        _fail(f"{str(directory)!r} holds no {DB_NAME}; run kvlab bench --out {directory} first")
    try:
        out.print(f"report: {build_report(directory, output)}")
        if markdown:
            with ResultStore(directory, read_only=True) as store:
                rows = store.rows()
            if rows:
                print(summary_markdown(rows), end="")
            else:  # a kvlab ppl store: its tables are in the report only
                err.print("no accuracy rows to print as Markdown (perplexity rows are in the report)")
    except kvlab.KvlabError as exc:
        _fail(str(exc))


@app.command()
def serve(
    model: Annotated[Optional[str], typer.Option(help="Local model dir or .gguf (default: SmolLM2-135M-Instruct).")] = None,
    recipe: Annotated[str, typer.Option(help="Default recipe; a request may name its own in {\"kvlab\": {\"recipe\": ...}}.")] = "full",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key_file: Annotated[Optional[Path], typer.Option(help="File of API keys, one per line, optionally followed by a tenant name.")] = None,
    max_cache_gib: Annotated[float, typer.Option(help="Most GiB of measured KV bytes the store of encoded contexts holds.")] = 4.0,
    max_queue: Annotated[int, typer.Option(help="Most requests waiting for the engine; beyond it a 503.")] = 64,
    max_batch: Annotated[int, typer.Option(help="Most requests decoding at once (their steps batched in one forward where the recipe allows).")] = 16,
    load_context: Annotated[Optional[list[Path]], typer.Option(help="A context saved by 'kvlab cache save', served to every tenant; repeatable.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API (chat, completions, streaming)."""
    import kvlab

    if not 0 < port < 65536:
        _fail(f"--port {port}: must be in 1..65535")
    if not max_cache_gib > 0:
        _fail(f"--max-cache-gib {max_cache_gib}: must be a number of GiB > 0")
    if max_queue < 0:
        _fail(f"--max-queue {max_queue}: must be an integer >= 0")
    if max_batch < 1:
        _fail(f"--max-batch {max_batch}: must be an integer >= 1")
    try:
        from kvlab.reuse import persist
        from kvlab.server import ServerConfig, serve as run_server
        from kvlab.server.auth import load_api_keys

        parsed = kvlab.parse_recipe(recipe)
        keys = load_api_keys(api_key_file) if api_key_file is not None else None
        config = ServerConfig(
            str(parsed), int(max_cache_gib * 2**30), max_queue, keys, tuple(str(p) for p in load_context or ()),
            max_batch,
        )
        for path in config.contexts:
            persist.read_header(path)  # a wrong file is refused before the model loads
        with err.status("loading model"):
            engine = kvlab.load(model, device=device, dtype=dtype, progress=False)
        from kvlab.server import create_app

        server_app = create_app(engine, config, on_stop=lambda: err.print("kvlab serve: stopped"))
    except kvlab.KvlabError as exc:
        _fail(str(exc))
        return
    keys_note = f", {len(keys)} API keys" if keys else ", no API key needed"
    err.print(
        f"kvlab serve: {engine.name} (recipe {parsed}) on http://{host}:{port}/v1 "
        f"(cache cap {max_cache_gib:g} GiB, queue {max_queue}, batch {max_batch}{keys_note}); Ctrl-C stops it",
        highlight=False,
    )
    run_server(server_app, host=host, port=port)


cache_app = typer.Typer(help="Encoded contexts on disk: encode once, answer from any process later.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("save")
def cache_save(
    context_file: Annotated[Path, typer.Option(help="Text file holding the context to encode.")],
    out_file: Annotated[Path, typer.Option("--out", help="File to write (safetensors with a kvlab header).")],
    recipe: Annotated[str, typer.Option(help="Recipe the context is encoded (compressed) with.")] = "full",
    model: Annotated[Optional[str], typer.Option(help="Local model dir or .gguf (default: SmolLM2-135M-Instruct).")] = None,
    mode: Annotated[str, typer.Option(help="multi-request or multi-turn: how later questions use it.")] = "multi-request",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    allow_overflow: Annotated[bool, typer.Option(help="Encode past the model's window anyway.")] = False,
) -> None:
    """Encode a context file with a recipe and write its cache to a file."""
    import kvlab

    context = _read_context(context_file)
    try:
        parsed = kvlab.parse_recipe(recipe)
        with err.status("loading model"):
            engine = kvlab.load(model, device=device, dtype=dtype, progress=False)
        session = engine.session(context, recipe=parsed, mode=mode, allow_overflow=allow_overflow)
        size = session.save(out_file)
    except kvlab.KvlabError as exc:
        _fail(str(exc))
        return
    stats = session.context_stats
    out.print(
        f"wrote {out_file} ({size / 2**20:.2f} MiB): {stats.prompt_tokens} context tokens, "
        f"{stats.kv_bytes / 2**20:.2f} MiB of KV, encoded with {parsed} on {engine.name} "
        f"in {stats.prefill_s:.2f} s", highlight=False,
    )


@cache_app.command("load")
def cache_load(
    file: Annotated[Path, typer.Argument(help="A file written by kvlab cache save (or Session.save).")],
    question: Annotated[list[str], typer.Option(help="A question; repeat for several.")],
    model: Annotated[Optional[str], typer.Option(help="The model the file was saved with (default: SmolLM2-135M-Instruct).")] = None,
    answer_prefix: Annotated[str, typer.Option(help="Text the answer starts with.")] = "",
    max_new_tokens: Annotated[int, typer.Option(help="Most tokens generated per answer.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Load a saved context and answer questions against it (no context prefill)."""
    import kvlab
    from kvlab.reuse import persist

    _check_max_new_tokens(max_new_tokens)
    try:
        header = persist.read_header(file)
        with err.status("loading model") if not as_json else _nothing():
            engine = kvlab.load(model, device=device, dtype=dtype, progress=False)
        session = kvlab.Session.load(engine, file)
        answers = [session.ask(q, answer_prefix=answer_prefix, max_new_tokens=max_new_tokens) for q in question]
    except kvlab.KvlabError as exc:
        _fail(str(exc))
        return
    if as_json:
        print(json.dumps({
            "model": engine.name, "recipe": header["recipe"], "mode": session.mode,
            "answers": [{"question": q, "answer": a.text, "stats": a.stats.as_dict()} for q, a in zip(question, answers)],
        }, indent=2))
        return
    out.print(f"[dim]model[/] {engine.name}   [dim]recipe[/] {header['recipe']}   [dim]loaded[/] {file}")
    for q, a in zip(question, answers):
        out.print(f"\n[bold]Q:[/] {q}\n[bold green]A:[/] {answer_prefix}{a.text}", highlight=False)
    out.print(_stats_table(session.context_stats, answers))


calibrate_app = typer.Typer(help="Measure once what a method needs of a model, kept on disk per model.", no_args_is_help=True)
app.add_typer(calibrate_app, name="calibrate")


@calibrate_app.command("dpe")
def calibrate_dpe(
    model: Annotated[Optional[str], typer.Option(help="Local model dir or .gguf (default: SmolLM2-135M-Instruct).")] = None,
    length: Annotated[Optional[str], typer.Option(help="Target length of the needle probes, e.g. 16k (default: twice the model's trained length).")] = None,
    window: Annotated[int, typer.Option(help="DPE's neighbour window W (the recipe's window).")] = 1024,
    groups: Annotated[int, typer.Option(help="Groups of RoPE dimension pairs, one scale each (the paper: 8).")] = 8,
    probes: Annotated[int, typer.Option(help="Needle probes scored per setting.")] = 4,
    probe_set: Annotated[Optional[str], typer.Option(help="Comma-separated probe families: passkey, words, multikey, multihop (default: all four).")] = None,
    candidates: Annotated[Optional[str], typer.Option(help="Comma-separated scales tried per group (default: 1, 2, 4, ... while length / scale >= window).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """DPE's needle sweep of group scales (arXiv:2504.18857); dpe(scales=calibrated) then uses them."""
    import dataclasses

    import kvlab
    from kvlab.bench.config import parse_length, split_list
    from kvlab.compress.duo_probes import DEFAULT_PROBE_SET
    from kvlab.position import dpe_search

    try:
        chosen = tuple(_int(x, "--candidates scale") for x in split_list(candidates)) if candidates else None
        with err.status("loading model") if not as_json else _nothing():
            engine = kvlab.load(model, device=device, dtype=dtype, progress=not as_json)
        search = dpe_search.search_settings(
            engine, parse_length(length) if length else 2 * engine.trained_length, window, groups,
            probes, probe_set or DEFAULT_PROBE_SET, chosen,
        )
        result = dpe_search.calibrate(engine, search)
    except kvlab.KvlabError as exc:
        _fail(str(exc))
        return
    path = dpe_search.calibration_path(engine)
    recipe = f"dpe(scales=calibrated, window={window})"
    if as_json:
        print(json.dumps({
            "model": engine.name, "search": dataclasses.asdict(search), "scales": list(result.scales),
            "seconds": result.seconds, "table": list(result.table), "file": str(path), "recipe": recipe,
        }, indent=2))
        return
    table = Table(title=f"dpe calibration of {engine.name}", caption=f"other groups held at scale {search.held}")
    for column in ("group", "scale", "needle accuracy", "answer log-prob (nats)", "chosen"):
        table.add_column(column, justify="right")
    for row in result.table:
        picked = "*" if result.scales[row["group"]] == row["scale"] else ""
        table.add_row(str(row["group"]), str(row["scale"]), f"{row['accuracy']:.2f}", f"{row['logprob']:.3f}", picked)
    out.print(table)
    out.print(
        f"scales {list(result.scales)} ({search.probes} probes of {search.length} tokens, window "
        f"{window}) in {result.seconds:.1f} s; written to {path}; use {recipe}", highlight=False,
    )


def _read_context(path: Path) -> str:
    if not path.is_file():
        _fail(f"--context-file {str(path)!r} is not a readable file")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        _fail(f"cannot read --context-file {str(path)!r}: {exc}")
    return ""


@app.command()
def tasks() -> None:
    """List the benchmark tasks."""
    from kvlab.bench.tasks import TASKS

    table = Table(title="kvlab bench tasks")
    for column in ("task", "family", "description"):
        table.add_column(column)
    for task in TASKS.values():
        table.add_row(task.name, task.family, task.description)
    out.print(table)


def _check_max_new_tokens(value: int) -> None:
    """Checked at argument time, before any model loads."""
    if value < 1:
        _fail(f"--max-new-tokens {value}: must be an integer >= 1 (tokens generated per answer)")


def _float(text: str, what: str) -> float:
    import kvlab

    try:
        return float(text)
    except ValueError:
        raise kvlab.InputError(f"{what} {text!r} is not a number") from None


def _int(text: str, what: str) -> int:
    import kvlab

    try:
        return int(text)
    except ValueError:
        raise kvlab.InputError(f"{what} {text!r} is not an integer") from None


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""kvlab vs kvpress (NVIDIA): the same cases, the same model, the same machine, one run.

For the methods both libraries have — ``full`` (no compression), SnapKV and StreamingLLM — at
equal kept fractions ``f`` (kvpress ``compression_ratio = 1 - f``, kvlab ``budget = f``), this
script runs kvlab's generated RULER/SCBench-style cases through kvpress's
``kv-press-text-generation`` pipeline and through a kvlab ``multi-request`` session, then
prints accuracy, wall time and measured KV-cache bytes side by side and writes them to
``benchmarks/results/vs_kvpress.json`` and ``.md``.

kvpress pins ``transformers<5.3``, which kvlab's environment cannot hold, so the kvpress side
runs in its own virtual environment (``benchmarks/.kvpress-venv``, created on first use with
kvpress and the *same* torch build as kvlab's — a local CPU wheel through pip's find-links,
never a CUDA download) in a subprocess, ``benchmarks/_kvpress_worker.py``. The two sides are
interleaved case by case (alternating which goes first) so both see the same machine load.

Prompts are identical token for token: both apply the model's chat template to
``context + "\\n\\n" + question`` as one user turn, then append the answer prefix; both
compress the templated context *without* the question (query-agnostic) and answer each
question against the compressed cache, greedy, with positions continuing after the original
context length. kvpress's pipeline puts nothing between context and question, so the worker
prepends kvlab's separator ``"\\n\\n"`` to each question.

    python benchmarks/vs_kvpress.py                        # defaults (a few minutes)
    python benchmarks/vs_kvpress.py --tasks niah_single --lengths 1000 --samples 1
    python benchmarks/vs_kvpress.py --methods snapkv --snapkv-window 64   # align SnapKV windows
    python benchmarks/vs_kvpress.py --setup-only           # only build the kvpress venv
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download weights, on either side
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from rich.console import Console  # noqa: E402
from rich.panel import Panel  # noqa: E402
from rich.progress import (  # noqa: E402
    BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
)
from rich.table import Table  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_VENV = HERE / ".kvpress-venv"
WORKER = HERE / "_kvpress_worker.py"
RESULTS = HERE / "results"
KVPRESS_VERSION = "0.5.5"  # the release this benchmark was written and checked against
METHODS = ("full", "snapkv", "streaming_llm")
PRESSES = {"snapkv": "SnapKVPress", "streaming_llm": "StreamingLLMPress"}
SNAPKV_DEFAULT_WINDOWS = {"kvlab": 32, "kvpress": 64}  # each library's default

console = Console(stderr=True)


class BenchError(Exception):
    """A failure with a message meant for the user (printed without a traceback)."""


# -- the kvpress virtual environment -----------------------------------------------------------


def find_links_dirs(explicit: list[str] | None) -> list[Path]:
    """Directories pip's find-links should search for the local torch wheel."""
    if explicit:
        return [Path(p) for p in explicit]
    dirs = [Path(p) for p in os.environ.get("PIP_FIND_LINKS", "").split() if p]
    if Path("/opt/wheels").is_dir():
        dirs.append(Path("/opt/wheels"))
    return list(dict.fromkeys(d for d in dirs if d.is_dir()))


def torch_requirement(explicit: str | None, links: list[Path]) -> str:
    """``torch==<kvlab's torch version>``, checked to resolve to a local wheel.

    kvlab's torch here is ``2.13.0+cpu``; pinning that exact version (local label included)
    means pip can only take the CPU wheel from find-links — PyPI has no ``+cpu`` builds, so a
    missing wheel fails at once instead of pulling multi-GB CUDA wheels.
    """
    if explicit:
        return explicit
    import torch

    version = torch.__version__
    if "+" not in version:
        if sys.platform.startswith("linux") and not torch.cuda.is_available():
            raise BenchError(
                f"kvlab's torch is {version} (no local label): pinning it on Linux would pull "
                "the CUDA build from PyPI. Pass --torch-spec (e.g. 'torch==2.13.0+cpu') with "
                "--find-links DIR holding that wheel."
            )
        return f"torch=={version}"
    tag = f"cp{sys.version_info.major}{sys.version_info.minor}"
    wheels = [w for d in links for w in d.glob(f"torch-{version}-{tag}-*.whl")]
    if not wheels:
        where = ", ".join(map(str, links)) or "no find-links directory"
        raise BenchError(
            f"no local wheel torch-{version}-{tag}-*.whl in {where}: the kvpress venv must use "
            "the same CPU torch as kvlab. Pass --find-links DIR (a folder with that wheel) or "
            "--torch-spec."
        )
    return f"torch=={version}"


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


_PROBE = (
    "import json, torch, transformers, kvpress; from importlib.metadata import version; "
    "print(json.dumps({'kvpress': version('kvpress'), 'torch': torch.__version__, "
    "'transformers': transformers.__version__, 'cuda': torch.version.cuda}))"
)


def probe(venv: Path) -> dict[str, Any] | None:
    py = venv_python(venv)
    if not py.is_file():
        return None
    out = subprocess.run([str(py), "-c", _PROBE], capture_output=True, text=True)
    if out.returncode != 0:
        return None
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return None


def ensure_venv(venv: Path, kvpress_version: str, torch_spec: str, links: list[Path]) -> dict[str, Any]:
    """Create ``venv`` with kvpress (and the pinned torch) unless it already has them."""
    want_torch = torch_spec.split("==", 1)[1] if "==" in torch_spec else None
    info = probe(venv)
    if info and info["kvpress"] == kvpress_version and (want_torch in (None, info["torch"])):
        return info
    venv.mkdir(parents=True, exist_ok=True)
    log = venv / "setup.log"
    with log.open("w") as out:
        if not venv_python(venv).is_file():
            with console.status(f"creating the kvpress virtual environment at {venv}"):
                # sys.executable's Python version matches the cpXY tag of kvlab's torch wheel
                done = subprocess.run([sys.executable, "-m", "venv", str(venv)], stdout=out,
                                      stderr=subprocess.STDOUT)
            if done.returncode != 0:
                out.close()
                _setup_failed(venv, log, "python -m venv failed")
        cmd = [str(venv_python(venv)), "-m", "pip", "install", "--disable-pip-version-check"]
        for d in links:
            cmd += ["--find-links", str(d)]
        # one command, so the resolver sees the torch pin while it resolves kvpress's deps
        cmd += [torch_spec, f"kvpress=={kvpress_version}"]
        out.write("$ " + " ".join(cmd) + "\n")
        out.flush()
        console.print(f"[bold]installing kvpress {kvpress_version} and {torch_spec} into {venv}[/] "
                      "(once; ~2 min)")
        with console.status("pip install ...") as status:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                out.write(line)
                if line.strip():
                    status.update(f"pip: {line.strip()[:100]}")
            proc.wait()
        if proc.returncode != 0:
            out.close()
            _setup_failed(venv, log, f"pip install exited with {proc.returncode}")
    info = probe(venv)
    if info is None:
        _setup_failed(venv, log, "kvpress does not import in the new environment")
    if info.get("cuda") and want_torch and "+cpu" in want_torch:
        _setup_failed(venv, log, f"torch in the venv is a CUDA build ({info['torch']})")
    return info


def _setup_failed(venv: Path, log: Path, why: str) -> None:
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:]) if log.is_file() else ""
    raise BenchError(
        f"setting up the kvpress environment failed: {why}.\n\nlast lines of {log}:\n{tail}\n\n"
        f"Fix the cause (network to PyPI, the local torch wheel) and run again; to start over, "
        f"delete {venv}."
    )


# -- cases and methods ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    key: str  # "full", "snapkv@0.5", ...
    name: str
    fraction: float | None  # kept fraction f; None for full
    recipe: str  # kvlab
    press: dict[str, Any]  # kvpress worker spec


def method_specs(names: list[str], fractions: list[float], snapkv_window: int | None) -> list[MethodSpec]:
    specs = []
    for name in names:
        if name == "full":
            specs.append(MethodSpec("full", "full", None, "full", {"key": "full", "press": None}))
            continue
        for f in fractions:
            key = f"{name}@{f:g}"
            kv_args, press_kwargs = [f"budget={f!r}"], {}
            if name == "snapkv" and snapkv_window is not None:
                kv_args.append(f"window={snapkv_window}")
                press_kwargs["window_size"] = snapkv_window
            press = {"key": key, "press": PRESSES[name], "compression_ratio": round(1.0 - f, 10),
                     "kwargs": press_kwargs}
            specs.append(MethodSpec(key, name, f, f"{name}({', '.join(kv_args)})", press))
    return specs


def make_cases(tokenizer: Any, tasks: list[str], lengths: list[int], samples: int) -> list[Any]:
    from kvlab.bench.tasks import get_task

    return [
        get_task(task).generate(tokenizer, length, seed, 0)
        for task in tasks for length in lengths for seed in range(samples)
    ]


def case_for_worker(case: Any) -> dict[str, Any]:
    return {
        "id": case.id,
        "context": case.context,
        "turns": [
            {"question": t.question, "answer_prefix": t.answer_prefix,
             "max_new_tokens": t.max_new_tokens}
            for t in case.turns
        ],
    }


# -- the two sides ------------------------------------------------------------------------------


def run_kvlab(engine: Any, case: Any, method: MethodSpec) -> dict[str, Any]:
    """One case through a kvlab multi-request session: compress the context once, ask each turn."""
    start = time.perf_counter()
    session = engine.session(case.context, recipe=method.recipe, mode="multi-request")
    context_s = time.perf_counter() - start
    answers = [
        session.ask(t.question, answer_prefix=t.answer_prefix, max_new_tokens=t.max_new_tokens)
        for t in case.turns
    ]
    wall_s = time.perf_counter() - start
    return {
        "case_id": case.id,
        "method": method.key,
        "answers": [a.text for a in answers],
        "token_ids": [list(a.token_ids) for a in answers],
        "wall_s": wall_s,
        "context_s": context_s,  # tokenization + prefill + compression of the context
        "answers_s": wall_s - context_s,  # question prefill + decoding, every turn
        "decode_s_per_token": [a.stats.decode_s_per_token for a in answers],
        "context_tokens": session.context_stats.prompt_tokens,
        "cache_bytes": session.context_stats.kv_bytes,  # compressed context, as kvpress's
        "cache_tokens": session.context_stats.kv_tokens,
        "answer_kv_bytes": [a.stats.kv_bytes for a in answers],  # + question and answer
        "prefill_s": session.context_stats.prefill_s,
    }


class Worker:
    """``_kvpress_worker.py --serve`` in the kvpress venv; one job file per case."""

    def __init__(self, python: Path, settings: dict[str, Any], tmp: Path, progress: Progress, task: Any):
        self.tmp, self.progress, self.task, self.n = tmp, progress, task, 0
        settings_path = tmp / "settings.json"
        settings_path.write_text(json.dumps(settings))
        self.log_path = tmp / "worker.log"
        self.log = self.log_path.open("w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "PYTHONUNBUFFERED": "1"}
        env.pop("PYTHONPATH", None)  # keep kvlab's environment out of the kvpress venv
        self.proc = subprocess.Popen(
            [str(python), str(WORKER), "--serve", str(settings_path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
            cwd=str(HERE),
        )
        self.hello = self._read_until("READY")

    def _read_until(self, marker: str) -> dict[str, Any] | str:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            if line.startswith("PROGRESS "):
                event = json.loads(line[9:])
                if event["event"] == "advance":
                    self.progress.advance(self.task)
                self.progress.update(self.task, description=event.get("label", ""))
            elif line.startswith(marker):
                rest = line[len(marker):].strip()
                return json.loads(rest) if rest.startswith("{") else rest
        self.proc.wait()
        self.log.flush()
        tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-25:])
        raise BenchError(f"the kvpress worker exited with {self.proc.returncode}:\n{tail}")

    def job(self, cases: list[dict[str, Any]], methods: list[dict[str, Any]]) -> dict[str, Any]:
        self.n += 1
        job_path, out_path = self.tmp / f"job{self.n}.json", self.tmp / f"out{self.n}.json"
        job_path.write_text(json.dumps({"cases": cases, "methods": methods}))
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{job_path} {out_path}\n")
        self.proc.stdin.flush()
        self._read_until("DONE")
        return json.loads(out_path.read_text())

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


# -- summary --------------------------------------------------------------------------------------


@dataclass
class Row:
    method: str
    turns: int = 0
    acc: dict[str, list[float]] = field(default_factory=lambda: {"kvpress": [], "kvlab": []})
    wall: dict[str, float] = field(default_factory=lambda: {"kvpress": 0.0, "kvlab": 0.0})
    context: dict[str, float] = field(default_factory=lambda: {"kvpress": 0.0, "kvlab": 0.0})
    answers: dict[str, float] = field(default_factory=lambda: {"kvpress": 0.0, "kvlab": 0.0})
    cache: dict[str, list[int]] = field(default_factory=lambda: {"kvpress": [], "kvlab": []})
    kept: dict[str, list[float]] = field(default_factory=lambda: {"kvpress": [], "kvlab": []})
    same_tokens: int = 0
    same_text: int = 0


def summarize(cases: list[Any], specs: list[MethodSpec], runs: dict[tuple[str, str, str], dict[str, Any]]):
    from kvlab.bench.metrics import score

    rows = {m.key: Row(m.key) for m in specs}
    by_task: dict[tuple[str, str], dict[str, list[float]]] = {}
    for case in cases:
        for m in specs:
            row = rows[m.key]
            for side in ("kvpress", "kvlab"):
                r = runs[(side, case.id, m.key)]
                r["scores"] = [score(t.metric, a or "", t.answers) for t, a in zip(case.turns, r["answers"])]
                row.acc[side] += r["scores"]
                row.wall[side] += r["wall_s"]
                row.context[side] += r["context_s"]
                row.answers[side] += r["answers_s"]
                row.cache[side].append(r["cache_bytes"])
                row.kept[side].append(r["cache_tokens"])
                by_task.setdefault((case.task, m.key), {"kvpress": [], "kvlab": []})[side] += r["scores"]
            p, k = runs[("kvpress", case.id, m.key)], runs[("kvlab", case.id, m.key)]
            row.turns += len(case.turns)
            row.same_tokens += sum(a == b for a, b in zip(p["token_ids"], k["token_ids"]))
            row.same_text += sum(a == b for a, b in zip(p["answers"], k["answers"]))
    summary = []
    for m in specs:
        row = rows[m.key]
        summary.append({
            "method": m.key,
            "fraction_kept": m.fraction,
            "kvlab_recipe": m.recipe,
            "kvpress_press": None if m.press["press"] is None else
            f"{m.press['press']}(compression_ratio={m.press['compression_ratio']:g}"
            + "".join(f", {k}={v}" for k, v in m.press["kwargs"].items()) + ")",
            "turns": row.turns,
            "kvpress_accuracy": mean(row.acc["kvpress"]),
            "kvlab_accuracy": mean(row.acc["kvlab"]),
            "kvpress_wall_s": row.wall["kvpress"],
            "kvlab_wall_s": row.wall["kvlab"],
            "time_ratio_kvlab_over_kvpress": row.wall["kvlab"] / row.wall["kvpress"],
            "kvpress_context_s": row.context["kvpress"],
            "kvlab_context_s": row.context["kvlab"],
            "kvpress_answers_s": row.answers["kvpress"],
            "kvlab_answers_s": row.answers["kvlab"],
            "kvpress_cache_bytes_mean": mean(row.cache["kvpress"]),
            "kvlab_cache_bytes_mean": mean(row.cache["kvlab"]),
            "kvpress_kept_tokens_mean": mean(row.kept["kvpress"]),
            "kvlab_kept_tokens_mean": mean(row.kept["kvlab"]),
            "identical_token_answers": row.same_tokens,
            "identical_text_answers": row.same_text,
        })
    tasks = sorted({c.task for c in cases})
    per_task = [
        {"task": t, "method": m.key,
         "kvpress_accuracy": mean(by_task[(t, m.key)]["kvpress"]),
         "kvlab_accuracy": mean(by_task[(t, m.key)]["kvlab"]),
         "turns": len(by_task[(t, m.key)]["kvlab"])}
        for t in tasks for m in specs
    ]
    return summary, per_task


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def rich_table(summary: list[dict[str, Any]]) -> Table:
    table = Table(title="kvlab vs kvpress — same cases, same model, same run",
                  caption="time: wall s summed over cases; kvlab/kvpress < 1: kvlab faster "
                          "(context: prefill + compression; answers: question + decoding). "
                          "KV MiB: compressed context cache, mean per case. same tokens: answers "
                          "with identical token ids.")
    for col, justify in [
        ("method", "left"), ("kept", "right"), ("acc kvpress", "right"), ("acc kvlab", "right"),
        ("time kvpress (s)", "right"), ("time kvlab (s)", "right"), ("kvlab/kvpress", "right"),
        ("context", "right"), ("answers", "right"),
        ("KV MiB kvpress", "right"), ("KV MiB kvlab", "right"), ("same tokens", "right"),
    ]:
        table.add_column(col, justify=justify, no_wrap=col == "method")
    for s in summary:
        ratio = s["time_ratio_kvlab_over_kvpress"]
        table.add_row(
            s["method"], "1" if s["fraction_kept"] is None else f"{s['fraction_kept']:g}",
            f"{s['kvpress_accuracy']:.3f}", f"{s['kvlab_accuracy']:.3f}",
            f"{s['kvpress_wall_s']:.1f}", f"{s['kvlab_wall_s']:.1f}",
            f"[{'green' if ratio < 1 else 'red'}]{ratio:.2f}x[/]",
            f"{s['kvlab_context_s'] / s['kvpress_context_s']:.2f}x",
            f"{s['kvlab_answers_s'] / s['kvpress_answers_s']:.2f}x",
            mib(s["kvpress_cache_bytes_mean"]), mib(s["kvlab_cache_bytes_mean"]),
            f"{s['identical_token_answers']}/{s['turns']}",
        )
    return table


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    env = report["env"]
    lines = [
        "# kvlab vs kvpress",
        "",
        f"Measured {report['date']} on {report['machine']['cpu']} ({report['machine']['cores']} "
        f"cores; load average {report['machine']['loadavg_start']} at start, "
        f"{report['machine']['loadavg_end']} at end), torch threads {s['threads']}, "
        f"total run {report['total_s']:.0f} s.",
        "",
        f"- model: {s['model']} (float32, CPU), both sides from `{s['model_path']}`",
        f"- kvlab {env['kvlab']['kvlab']} (transformers {env['kvlab']['transformers']}, torch "
        f"{env['kvlab']['torch']}); kvpress {env['kvpress']['kvpress']} (transformers "
        f"{env['kvpress']['transformers']}, torch {env['kvpress']['torch']})",
        f"- cases: tasks {', '.join(s['tasks'])}; lengths {', '.join(map(str, s['lengths']))} "
        f"tokens; {s['samples']} seed(s); {report['n_cases']} cases, {report['n_turns']} questions",
        f"- SnapKV window: kvlab {s['snapkv_window']['kvlab']}, kvpress "
        f"{s['snapkv_window']['kvpress']}",
        "- time: wall seconds summed over the cases (context prefill + compression + every "
        "answer); `kvlab/kvpress` < 1 means kvlab was faster",
        "- KV MiB: mean over cases of the bytes of the compressed context cache (kvpress: "
        "keys + values in the DynamicCache after the pipeline; kvlab: keys + values + int32 "
        "position indices of kept entries)",
        "- same tokens: answers whose generated token ids are identical in both libraries",
        "",
        "| method | kept | acc kvpress | acc kvlab | time kvpress (s) | time kvlab (s) | "
        "kvlab/kvpress | KV MiB kvpress | KV MiB kvlab | same tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["summary"]:
        lines.append(
            f"| {r['method']} | {'1' if r['fraction_kept'] is None else format(r['fraction_kept'], 'g')} "
            f"| {r['kvpress_accuracy']:.3f} | {r['kvlab_accuracy']:.3f} | {r['kvpress_wall_s']:.1f} "
            f"| {r['kvlab_wall_s']:.1f} | {r['time_ratio_kvlab_over_kvpress']:.2f}x "
            f"| {mib(r['kvpress_cache_bytes_mean'])} | {mib(r['kvlab_cache_bytes_mean'])} "
            f"| {r['identical_token_answers']}/{r['turns']} |"
        )
    lines += ["", "Where the time went (seconds, summed over cases; context = tokenization + "
              "prefill + compression of the context, answers = question prefill + decoding of "
              "every question):", "",
              "| method | context kvpress | context kvlab | kvlab/kvpress | answers kvpress "
              "| answers kvlab | kvlab/kvpress |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["summary"]:
        lines.append(
            f"| {r['method']} | {r['kvpress_context_s']:.1f} | {r['kvlab_context_s']:.1f} "
            f"| {r['kvlab_context_s'] / r['kvpress_context_s']:.2f}x | {r['kvpress_answers_s']:.1f} "
            f"| {r['kvlab_answers_s']:.1f} | {r['kvlab_answers_s'] / r['kvpress_answers_s']:.2f}x |"
        )
    lines += ["", "Accuracy per task (kvpress / kvlab):", "",
              "| method | " + " | ".join(sorted({p["task"] for p in report["per_task"]})) + " |",
              "|---|" + "---:|" * len({p["task"] for p in report["per_task"]})]
    for r in report["summary"]:
        cells = [f"{p['kvpress_accuracy']:.2f} / {p['kvlab_accuracy']:.2f}"
                 for p in sorted(report["per_task"], key=lambda p: p["task"]) if p["method"] == r["method"]]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# -- main -------------------------------------------------------------------------------------


def csv(kind: Any):
    def parse(text: str) -> list[Any]:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated {kind.__name__}s")
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=csv(str), default=["niah_single", "kv_retrieval"],
                   help="kvlab task generators (default: niah_single,kv_retrieval)")
    p.add_argument("--lengths", type=csv(int), default=[1000, 2000],
                   help="context lengths in tokens (default: 1000,2000)")
    p.add_argument("--samples", type=int, default=1, help="seeds per task and length (default: 1)")
    p.add_argument("--ratios", type=csv(float), default=[0.5, 0.25],
                   help="kept fractions f: kvlab budget=f, kvpress compression_ratio=1-f "
                        "(default: 0.5,0.25)")
    p.add_argument("--methods", type=csv(str), default=list(METHODS),
                   help="subset of full,snapkv,streaming_llm (default: all)")
    p.add_argument("--snapkv-window", type=int, default=None,
                   help="SnapKV observation window for both libraries (default: each library's "
                        "own default, kvlab 32, kvpress 64)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads on both sides (default 1: on a shared 2-core machine more "
                        "threads than free cores make OpenMP spin and timings explode)")
    p.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up")
    p.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"kvpress venv (default {DEFAULT_VENV})")
    p.add_argument("--kvpress-version", default=KVPRESS_VERSION)
    p.add_argument("--find-links", action="append", default=None, metavar="DIR",
                   help="folder with the local torch wheel (default: $PIP_FIND_LINKS, /opt/wheels)")
    p.add_argument("--torch-spec", default=None,
                   help="torch requirement for the kvpress venv (default: torch==<kvlab's torch>)")
    p.add_argument("--out", type=Path, default=RESULTS / "vs_kvpress.json",
                   help="JSON results (a .md table is written beside it)")
    p.add_argument("--setup-only", action="store_true", help="only create the kvpress venv")
    args = p.parse_args(argv)
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"--methods: unknown {bad}; use {','.join(METHODS)}")
    if any(not 0 < f < 1 for f in args.ratios):
        p.error("--ratios: kept fractions must lie strictly between 0 and 1")
    if args.samples < 1 or args.threads < 1:
        p.error("--samples and --threads must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.perf_counter()
    loadavg_start = _loadavg()
    links = find_links_dirs(args.find_links)
    torch_spec = torch_requirement(args.torch_spec, links)
    kvpress_env = ensure_venv(args.venv, args.kvpress_version, torch_spec, links)
    console.print(f"kvpress environment: kvpress {kvpress_env['kvpress']}, transformers "
                  f"{kvpress_env['transformers']}, torch {kvpress_env['torch']} ({args.venv})")
    if args.setup_only:
        return 0

    import torch

    torch.set_num_threads(args.threads)
    import transformers

    import kvlab
    from kvlab.engine.loading import converted_gguf, default_gguf
    from kvlab.engine.prompt import QUESTION_SEPARATOR

    with console.status("loading kvlab's default model"):
        model_path = converted_gguf(default_gguf())
        engine = kvlab.load(device="cpu", dtype="float32", progress=False)
    with console.status("generating cases"):
        cases = make_cases(engine.tokenizer, args.tasks, args.lengths, args.samples)
    specs = method_specs(args.methods, args.ratios, args.snapkv_window)
    press_methods = [m.press for m in specs]
    runs: dict[tuple[str, str, str], dict[str, Any]] = {}
    settings = {
        "model_path": str(model_path),
        "threads": args.threads,
        "max_context_length": engine.trained_length,
        "question_prefix": QUESTION_SEPARATOR,
    }

    columns = [SpinnerColumn(), TextColumn("{task.description:<48}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn()]
    with tempfile.TemporaryDirectory(prefix="vs_kvpress-") as tmp, \
            Progress(*columns, console=console, transient=False) as progress:
        total = 2 * len(cases) * len(specs)
        task = progress.add_task("starting the kvpress worker", total=total)
        worker = Worker(venv_python(args.venv), settings, Path(tmp), progress, task)
        try:
            if not args.no_warmup:
                # every method once on the first case's first question, on both sides
                progress.update(task, description="warm-up (untimed)")
                from kvlab.bench.cases import Case

                warm = cases[0]
                short = Case(warm.id, warm.task, warm.context, warm.turns[:1], warm.target_tokens)
                worker.job([case_for_worker(short)], press_methods)
                for m in specs:
                    run_kvlab(engine, short, m)
                progress.reset(task, total=total)
            for i, case in enumerate(cases):
                order = ("kvpress", "kvlab") if i % 2 == 0 else ("kvlab", "kvpress")
                for side in order:
                    if side == "kvpress":
                        out = worker.job([case_for_worker(case)], press_methods)
                        for r in out["results"]:
                            runs[("kvpress", r["case_id"], r["method"])] = r
                    else:
                        for m in specs:
                            progress.update(task, description=f"kvlab {case.id} {m.key}")
                            runs[("kvlab", case.id, m.key)] = run_kvlab(engine, case, m)
                            progress.advance(task)
        finally:
            worker.close()
        progress.update(task, description="done")

    summary, per_task = summarize(cases, specs, runs)
    window = args.snapkv_window
    report = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": {
            "cpu": _cpu_name(), "cores": os.cpu_count(), "platform": platform.platform(),
            "loadavg_start": loadavg_start, "loadavg_end": _loadavg(),
        },
        "total_s": time.perf_counter() - began,
        "settings": {
            "model": engine.name, "model_path": str(model_path), "tasks": args.tasks,
            "lengths": args.lengths, "samples": args.samples, "fractions_kept": args.ratios,
            "methods": [m.key for m in specs], "threads": args.threads,
            "warmup": not args.no_warmup, "mode": "multi-request (query-agnostic compression)",
            "question_separator": QUESTION_SEPARATOR,
            "snapkv_window": {"kvlab": window or SNAPKV_DEFAULT_WINDOWS["kvlab"],
                              "kvpress": window or SNAPKV_DEFAULT_WINDOWS["kvpress"]},
        },
        "env": {
            "kvlab": {"kvlab": kvlab.__version__, "transformers": transformers.__version__,
                      "torch": torch.__version__, "python": platform.python_version()},
            "kvpress": worker.hello["env"] if isinstance(worker.hello, dict) else kvpress_env,
        },
        "n_cases": len(cases),
        "n_turns": sum(len(c.turns) for c in cases),
        "summary": summary,
        "per_task": per_task,
        "cases": [
            {"id": c.id, "task": c.task, "target_tokens": c.target_tokens,
             "context_tokens": c.meta.get("tokens"), "turns": [t.__dict__ for t in c.turns]}
            for c in cases
        ],
        "runs": [{"side": side, **r} for (side, _, _), r in runs.items()],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    md_path = args.out.with_suffix(".md")
    md_path.write_text(markdown(report))

    out = Console(width=None if sys.stdout.isatty() else 150)
    out.print(rich_table(summary))
    full = next((s for s in summary if s["method"] == "full"), None)
    if full:
        verdict = "all" if full["identical_token_answers"] == full["turns"] else "not all"
        out.print(f"full (no compression): {full['identical_token_answers']}/{full['turns']} answers "
                  f"identical token for token ({verdict}).")
    out.print(f"wrote {args.out} and {md_path} ({report['total_s']:.0f} s in all)")
    return 0


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchError as exc:
        console.print(Panel(str(exc), title="vs_kvpress: error", border_style="red"))
        sys.exit(2)
    except Exception as exc:
        if type(exc).__module__ != "kvlab.errors":  # kvlab's input/model/recipe errors
            raise
        console.print(Panel(str(exc), title="vs_kvpress: kvlab error", border_style="red"))
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)

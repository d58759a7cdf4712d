#!/usr/bin/env python
"""kvlab vs kvpress (NVIDIA): the same cases, the same model, the same machine, one run.

For every method both libraries have (SnapKV, StreamingLLM, KNorm, KeyDiff, TOVA, Expected
Attention, PyramidKV, H2O, AdaKV, ThinK, SnapKV + ThinK, DuoAttention; ``full`` as the
reference), at equal kept fractions ``f`` (kvpress ``compression_ratio = 1 - f``; kvlab gets
kvpress's kept entries per layer and KV head as an integer budget, computed per case) and with
the other settings aligned (windows, kernels, sinks, layers kept whole, ...; see ``build_spec``
and ``NOTES`` for what could not be), this script runs kvlab's generated RULER/SCBench-style
cases through kvpress's ``kv-press-text-generation`` pipeline and through a kvlab
``multi-request`` session, then prints accuracy, token agreement, wall time and measured
KV-cache bytes side by side and writes them to ``benchmarks/results/vs_kvpress.json`` and
``.md``. A method the installed kvlab does not have (``kvlab.methods()``) is skipped with a
printed note.

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

    python benchmarks/vs_kvpress.py                        # defaults (every method; 16-25 min)
    python benchmarks/vs_kvpress.py --methods snapkv,knorm --ratios 0.25 --samples 1
    python benchmarks/vs_kvpress.py --tasks niah_single,kv_retrieval --lengths 1000,2000
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
from typing import Any, Callable

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
#
# Every method both libraries have. For each, the kvpress press and the kvlab recipe are set
# to the same settings: the same kept entries per layer and KV head (kvlab gets kvpress's
# count as an int budget, computed per case from the context length n: kvpress truncates
# n * (1 - compression_ratio), kvlab would round f * n), the same windows, kernels, sinks,
# pooling. What cannot be aligned is recorded in NOTES (and in the README's mapping table).

ALL_METHODS = (
    "full", "snapkv", "streaming_llm", "knorm", "keydiff", "tova", "expected_attention",
    "pyramidkv", "h2o", "adakv", "think", "snapkv+think", "duo_attention",
)
KVLAB_NAMES = {"snapkv+think": ("snapkv", "think")}  # kvlab methods a row needs (default: its name)
NOTES = {
    "full": "",
    "snapkv": "kvlab sums the window's votes, kvpress averages them (same ranking)",
    "streaming_llm": "",
    "knorm": "kvlab's default skip_layers=2 (the authors' code keeps layers 0-1 whole) set to 0, "
             "as kvpress compresses every layer",
    "keydiff": "",
    "tova": "kvpress always keeps the context's last token and ranks the others by the last "
            "query's attention; kvlab ranks all n entries (last one included). kvlab also evicts "
            "one entry per decoded token once over the budget (TOVA's per-step form, no switch); "
            "kvpress compresses the context only, so its cache grows by question + answer",
    "expected_attention": "",
    "pyramidkv": "the budget formulas differ (kvpress counts the window inside the pyramid and "
                 "falls back to uniform SnapKV budgets when C/beta < window; kvlab adds the window "
                 "to every layer and never falls back): kvlab's budget and beta are set per case "
                 "so its per-layer budgets equal kvpress's (largest difference in the JSON)",
    "h2o": "kvpress (ObservedAttentionPress, eager attention for the prefill) averages each key's "
           "attention over the queries that see it; kvlab sums it (H2O's accumulated score) - a "
           "different ranking. kvlab recent=0 as kvpress keeps no recent window; kvlab evicts "
           "per decoded token (H2O's per-step form) and holds fp32 scores (in its bytes)",
    "adakv": "the safeguard differs: kvpress guarantees each head its top int(alpha*B) entries "
             "(window included) and takes the rest by global rank; kvlab gives head h "
             "alpha*C + (1-alpha)*hits_h of C = B - window (hits in the global top Hkv*C, the "
             "reference code's rule) plus the window. kvpress masks the pruned entries (fake keys "
             "at attention time): its tensors keep every entry; kvlab stores heads ragged",
    "think": "kvpress zeroes the pruned key channels: its tensors keep their shape",
    "snapkv+think": "kvpress: ComposedPress([SnapKV, ThinK]); zeroed channels keep their shape",
    "duo_attention": "heads chosen independently: kvpress's on-the-fly scoring (mean query/key "
                     "over 50 texts; BookSum replaced by 50 chunks of kvlab's prose corpus, "
                     "offline), kvlab's passkey probes. kvlab evict_every=10**9: streaming heads do "
                     "not evict while answering, as kvpress only masks the context's middle "
                     "entries (its tensors stay full)",
}


class Unmappable(Exception):
    """A method that cannot be written for the kvlab installed here (skipped with a note)."""


@dataclass(frozen=True)
class PerCase:
    """A kvlab parameter value computed from the case's context length ``n`` (tokens)."""

    label: str  # shown in the recipe template
    fn: Callable[[int], Any]


@dataclass(frozen=True)
class Options:
    window: int  # observation window of SnapKV, PyramidKV, AdaKV(SnapKV), ThinK
    kernel: int
    pyramid_beta: float
    think_ratio: float
    adakv_safeguard: float
    num_layers: int


def kvpress_kept(n: int, compression_ratio: float) -> int:
    """Entries per layer and KV head a kvpress ScorerPress keeps (``kvpress.utils.compute_n_kept``,
    the same float expression, so the same integer)."""
    if compression_ratio >= 1.0:
        return 0
    return max(1, int(n * (1 - compression_ratio)))


def kvpress_pyramid(n: int, cr: float, window: int, beta: float, layers: int) -> tuple[list[int], bool]:
    """kvpress ``PyramidKVPress.get_layer_budget`` for every layer, and whether it fell back to
    SnapKV's uniform budget (when the pyramid's smallest layer would be below the window)."""
    capacity = window + n * (1 - cr)
    low = (capacity - window) / beta
    high = (capacity - window) * 2 - low
    if high >= n - window:
        high = n - window
        low = (capacity - window) * 2 - high
    if not (n >= high >= low >= window):
        return [max(1, round(n * (1 - cr)))] * layers, True
    steps = (high - low) / (layers - 1) if layers > 1 else 0.0
    return [round(high - i * steps) for i in range(layers)], False


def kvlab_pyramid_args(n: int, cr: float, window: int, beta: float, layers: int) -> tuple[int, float]:
    """kvlab ``pyramidkv`` (budget, beta) whose layer budgets equal kvpress's for this ``n``.

    kvlab: layer l keeps ``round(high - l * step) + w`` with ``C = B - w``, ``low = C / beta``,
    ``high = 2C - low``; kvpress: ``round(high' - l * step')`` with the window inside and
    ``low' + high' = 2 n f``. With ``B = round(n f)`` and ``beta = (B - w) / (low' - w)``,
    kvlab's ``low + w = low'`` and ``high + w = high'`` (up to ``B - n f``, under one entry);
    kvpress's fallback to uniform budgets is kvlab's ``beta=1``."""
    budgets, fallback = kvpress_pyramid(n, cr, window, beta, layers)
    total = round(n * (1 - cr))
    if fallback:
        return budgets[0], 1.0
    chosen = n * (1 - cr)  # kvpress's max_capacity_prompt - window_size
    low = chosen / beta
    if chosen * 2 - low >= n - window:
        low = chosen * 2 - (n - window)
    if low <= window:
        return total, 1e9  # kvpress's smallest layer keeps the window alone
    return total, max(1.0, (total - window) / (low - window))


class KvlabTerm:
    """One kvlab recipe term ``name(param=value, ...)``, written against the parameters the
    installed kvlab declares for the method (``kvlab.methods()``): a value whose parameter
    kvlab lacks is left out and noted, or makes the method unmappable when it is required."""

    def __init__(self, name: str, declared: dict[str, Any]) -> None:
        if name not in declared:
            raise Unmappable(f"kvlab has no method {name!r} (kvlab.methods() does not list it)")
        self.name, self.params = name, declared[name]
        self.args: list[tuple[str, Any]] = []
        self.notes: list[str] = []

    def set(self, names: str | tuple[str, ...], value: Any, what: str = "",
            required: bool = False) -> "KvlabTerm":
        names = (names,) if isinstance(names, str) else names
        found = next((p for p in names if p in self.params), None)
        if found is None:
            msg = (f"kvlab {self.name} has no parameter {' / '.join(names)} ({what or 'aligned value'}); "
                   f"its parameters: {', '.join(sorted(self.params)) or 'none'}")
            if required:
                raise Unmappable(msg)
            self.notes.append("not aligned: " + msg)
            return self
        if len(names) > 1:  # a guessed name: show its help so the meaning can be checked
            self.notes.append(f"{what or names[0]} -> kvlab {self.name}.{found} "
                              f"({self.params[found] or 'no help'})")
        self.args.append((found, value))
        return self

    def render(self, n: int | None) -> str:
        def fmt(v: Any) -> str:
            if isinstance(v, PerCase):
                return v.label if n is None else fmt(v.fn(n))
            return repr(v)

        return f"{self.name}({', '.join(f'{k}={fmt(v)}' for k, v in self.args)})"


@dataclass(frozen=True)
class MethodSpec:
    key: str  # "full", "snapkv@0.5", ...
    name: str
    fraction: float | None  # kept fraction f (of entries; of heads for duo_attention); None: n/a
    kept: str  # the "kept" column
    press: dict[str, Any]  # kvpress worker spec
    terms: tuple[KvlabTerm, ...]  # kvlab recipe, per case
    notes: tuple[str, ...] = ()

    def recipe(self, n: int) -> str:
        return " + ".join(t.render(n) for t in self.terms) or "full"

    @property
    def template(self) -> str:
        return " + ".join(t.render(None) for t in self.terms) or "full"

    @property
    def press_text(self) -> str:
        eager = " [eager prefill]" if self.press.get("eager_prefill") else ""
        return press_repr(self.press["press"]) + eager


def press_repr(tree: Any) -> str:
    if tree is None:
        return "no press"
    if isinstance(tree, list):
        return "[" + ", ".join(press_repr(t) for t in tree) + "]"
    if isinstance(tree, dict) and "class" in tree:
        args = ", ".join(f"{k}={press_repr(v)}" for k, v in tree.get("kwargs", {}).items())
        return f"{tree['class']}({args})"
    return f"{tree:g}" if isinstance(tree, float) else repr(tree)


def press(cls: str, **kwargs: Any) -> dict[str, Any]:
    return {"class": cls, "kwargs": kwargs}


def build_spec(name: str, f: float | None, opt: Options, declared: dict[str, Any]) -> MethodSpec:
    """The kvpress press and the kvlab recipe of one row (``f``: kept fraction)."""
    if name == "full":
        return MethodSpec("full", "full", None, "1", {"key": "full", "press": None}, ())
    w, kernel = opt.window, opt.kernel
    cr = None if f is None else round(1.0 - f, 10)  # kvpress compression_ratio
    kept = None if cr is None else PerCase(f"floor(n*{f:g})", lambda n, cr=cr: kvpress_kept(n, cr))
    key, label, eager = f"{name}@{f:g}" if f is not None else name, f"{f:g}" if f is not None else "1", False

    def term(method: str) -> KvlabTerm:
        return KvlabTerm(method, declared)

    def snapkv_term(method: str = "snapkv") -> KvlabTerm:
        return (term(method).set("budget", kept, "kept entries", required=True)
                .set("window", w, "observation window").set("kernel", kernel, "pooling kernel")
                .set("pooling", "avg", "pooling").set("gqa_reduce", "mean", "GQA reduction"))

    snap_press = press("SnapKVPress", compression_ratio=cr, window_size=w, kernel_size=kernel)
    think_press = press("ThinKPress", key_channel_compression_ratio=opt.think_ratio, window_size=w)

    def think_term() -> KvlabTerm:
        return (term("think")
                .set(("ratio", "key_channel_compression_ratio", "channel_ratio", "pruned"),
                     opt.think_ratio, "share of key channels pruned", required=True)
                .set(("window", "window_size"), w, "observation window"))

    if name == "snapkv":
        terms, tree = [snapkv_term()], snap_press
    elif name == "streaming_llm":
        budget = PerCase(f"floor(n*{f:g})", lambda n, cr=cr: int(n * (1 - cr)))
        terms = [term(name).set("budget", budget, required=True).set("sink", 4, "sink tokens")]
        tree = press("StreamingLLMPress", compression_ratio=cr, n_sink=4)
    elif name == "knorm":
        terms = [term(name).set("budget", kept, required=True).set("window", 0, "recent window")
                 .set("skip_layers", 0, "layers kept whole")]
        tree = press("KnormPress", compression_ratio=cr)
    elif name == "keydiff":
        terms = [term(name).set("budget", kept, required=True).set("window", 0, "recent window")]
        tree = press("KeyDiffPress", compression_ratio=cr)
    elif name == "tova":
        terms = [term(name).set("budget", kept, required=True)]
        tree = press("TOVAPress", compression_ratio=cr)
    elif name == "expected_attention":
        terms = [term(name).set("budget", kept, required=True).set("future", 512).set("sink", 4)
                 .set("covariance", True).set("value_norm", True).set("epsilon", 0.0)]
        tree = press("ExpectedAttentionPress", compression_ratio=cr, n_future_positions=512,
                     n_sink=4, use_covariance=True, use_vnorm=True, epsilon=0.0)
    elif name == "pyramidkv":
        args = (w, opt.pyramid_beta, opt.num_layers)
        budget = PerCase("round(n*%g)" % f, lambda n, cr=cr: kvlab_pyramid_args(n, cr, *args)[0])
        beta = PerCase("matched", lambda n, cr=cr: kvlab_pyramid_args(n, cr, *args)[1])
        t = snapkv_term("pyramidkv")
        t.args = [(k, budget if k == "budget" else v) for k, v in t.args]
        terms = [t.set("beta", beta, "pyramid steepness", required=True)]
        beta_press = int(opt.pyramid_beta) if float(opt.pyramid_beta).is_integer() else opt.pyramid_beta
        tree = press("PyramidKVPress", compression_ratio=cr, window_size=w, kernel_size=kernel,
                     beta=beta_press)
    elif name == "h2o":
        terms = [term(name).set("budget", kept, required=True).set("recent", 0.0, "recent share")]
        tree, eager = press("ObservedAttentionPress", compression_ratio=cr), True
    elif name == "adakv":
        terms = [snapkv_term("adakv").set("scorer", "snapkv", "base scores").set(
            ("alpha", "alpha_safeguard", "safeguard", "min_share"), opt.adakv_safeguard,
            "per-head safeguard share")]
        tree = press("AdaKVPress", press=snap_press, alpha_safeguard=opt.adakv_safeguard)
    elif name == "think":
        key, label = f"think(r={opt.think_ratio:g})", f"1 (K ch. {1 - opt.think_ratio:g})"
        terms, tree = [think_term()], think_press
    elif name == "snapkv+think":
        label = f"{f:g} (K ch. {1 - opt.think_ratio:g})"
        terms = [snapkv_term(), think_term()]
        tree = press("ComposedPress", presses=[snap_press, think_press])
    elif name == "duo_attention":
        label = f"{f:g} of heads"
        t = term(name)
        streaming = round(1.0 - f, 10)
        names_streaming = ("head_compression_ratio", "head_ratio", "streaming_ratio", "streaming",
                           "streaming_heads", "sparsity", "ratio")
        names_retrieval = ("retrieval_ratio", "retrieval", "retrieval_heads", "full_heads", "heads")
        if any(p in t.params for p in names_streaming):
            t.set(names_streaming, streaming, "share of KV heads made streaming", required=True)
        else:
            t.set(names_retrieval, f, "share of KV heads kept as retrieval heads", required=True)
        t.set(("sink", "sink_size"), 128, "streaming heads' sinks").set(
            ("recent", "recent_size", "window"), 256, "streaming heads' recent window").set(
            "evict_every", 10**9, "no eviction while decoding (kvpress masks the context only)")
        terms = [t]
        tree = press("DuoAttentionPress", head_compression_ratio=streaming, on_the_fly_scoring=True)
    else:
        raise ValueError(name)
    notes = tuple(n for t in terms for n in t.notes)
    return MethodSpec(key, name, f, label, {"key": key, "press": tree, "eager_prefill": eager},
                      tuple(terms), notes)


def method_specs(names: list[str], fractions: list[float], opt: Options,
                 declared: dict[str, Any]) -> tuple[list[MethodSpec], dict[str, str]]:
    """The rows to run, and the methods skipped with the reason."""
    specs, skipped = [], {}
    for name in names:
        missing = [m for m in KVLAB_NAMES.get(name, (name,)) if m != "full" and m not in declared]
        if missing:
            skipped[name] = (f"kvlab has no method {', '.join(map(repr, missing))} yet "
                             "(kvlab.methods() does not list it)")
            continue
        try:
            if name in ("full", "think"):
                specs.append(build_spec(name, None, opt, declared))
            else:
                specs.extend(build_spec(name, f, opt, declared) for f in fractions)
        except Unmappable as exc:
            skipped[name] = str(exc)
    return specs, skipped


def kvlab_declared() -> dict[str, dict[str, str]]:
    """kvlab's methods and, for each, its parameters with their help text."""
    import kvlab

    return {m.name: {p.name: p.help for p in m.params} for m in kvlab.methods()}


def make_cases(tokenizer: Any, tasks: list[str], lengths: list[int], samples: int) -> list[Any]:
    from kvlab.bench.tasks import get_task

    return [
        get_task(task).generate(tokenizer, length, seed, 0)
        for task in tasks for length in lengths for seed in range(samples)
    ]


def warmup_case(tokenizer: Any, task: str) -> Any:
    """A short case (512 tokens, one question, 4 new tokens) that runs every method once on each
    side before the timed cases: lazy imports, first-call allocations, and the one-off work of
    some methods (DuoAttention's head scoring) stay out of the timings."""
    from kvlab.bench.cases import Case
    from kvlab.bench.tasks import get_task

    case = get_task(task).generate(tokenizer, 512, 10_000, 0)
    turn = case.turns[0]
    short = type(turn)(**{**turn.__dict__, "max_new_tokens": 4})
    return Case(case.id + "-warmup", case.task, case.context, [short], case.target_tokens)


def calibration_texts(count: int = 50, words: int = 250) -> list[str]:
    """Text for kvpress's DuoAttention head scoring, in place of BookSum chapters (offline):
    ``count`` consecutive chunks of ``words`` words of kvlab's shipped prose corpus (Pride and
    Prejudice), so both libraries' calibration data is public-domain book prose."""
    from kvlab.corpus import prose_text

    tokens = prose_text().split()
    return [" ".join(tokens[i * words:(i + 1) * words]) for i in range(count)]


def context_tokens(engine: Any, context: str) -> int:
    """Tokens of the templated context a kvlab session prefills (kvpress's context_ids: the same
    ids, checked in every run)."""
    fmt = engine.format
    return len(fmt.encode(fmt.context_head(context), first=True))


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
    n = context_tokens(engine, case.context)
    recipe = method.recipe(n)
    start = time.perf_counter()
    session = engine.session(case.context, recipe=recipe, mode="multi-request")
    context_s = time.perf_counter() - start
    answers = [
        session.ask(t.question, answer_prefix=t.answer_prefix, max_new_tokens=t.max_new_tokens)
        for t in case.turns
    ]
    wall_s = time.perf_counter() - start
    if session.context_stats.prompt_tokens != n:
        raise BenchError(f"{case.id}: kvlab prefilled {session.context_stats.prompt_tokens} context "
                         f"tokens, the recipe was computed for {n}")
    return {
        "case_id": case.id,
        "method": method.key,
        "recipe": recipe,
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
    effective: list[int] = field(default_factory=list)  # kvpress: without masked/zeroed parts
    effective_kept: list[float] = field(default_factory=list)
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
            row.effective.append(p.get("effective_bytes", p["cache_bytes"]))
            row.effective_kept.append(p.get("effective_tokens", p["cache_tokens"]))
            row.turns += len(case.turns)
            row.same_tokens += sum(a == b for a, b in zip(p["token_ids"], k["token_ids"]))
            row.same_text += sum(a == b for a, b in zip(p["answers"], k["answers"]))
    summary = []
    for m in specs:
        row = rows[m.key]
        summary.append({
            "method": m.key,
            "name": m.name,
            "fraction_kept": m.fraction,
            "kept": m.kept,
            "kvlab_recipe": m.template,
            "kvpress_press": m.press_text,
            "notes": NOTES.get(m.name, ""),
            "alignment_notes": list(m.notes),
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
            "kvpress_effective_bytes_mean": mean(row.effective),
            "kvlab_cache_bytes_mean": mean(row.cache["kvlab"]),
            "kvpress_kept_tokens_mean": mean(row.kept["kvpress"]),
            "kvpress_effective_tokens_mean": mean(row.effective_kept),
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


def pyramid_check(specs: list[MethodSpec], cases: list[Any], engine: Any,
                  opt: Options) -> list[dict[str, Any]]:
    """Per pyramidkv row and case: kvpress's layer budgets, kvlab's with the matched recipe, and
    the largest difference (kvlab's own ``pyramid_budgets``, so a change there shows here)."""
    from kvlab.compress.pyramidkv import pyramid_budgets

    out = []
    for m in specs:
        if m.name != "pyramidkv":
            continue
        cr = round(1.0 - m.fraction, 10)
        for case in cases:
            n = context_tokens(engine, case.context)
            theirs, fallback = kvpress_pyramid(n, cr, opt.window, opt.pyramid_beta, opt.num_layers)
            budget, beta = kvlab_pyramid_args(n, cr, opt.window, opt.pyramid_beta, opt.num_layers)
            ours = pyramid_budgets(budget, min(opt.window, budget), n, opt.num_layers, beta)
            out.append({"method": m.key, "case_id": case.id, "n": n, "kvpress_fallback": fallback,
                        "kvpress_layer_budgets": theirs, "kvlab_layer_budgets": ours,
                        "max_abs_diff": max(abs(a - b) for a, b in zip(theirs, ours)),
                        "kvlab_recipe": m.recipe(n)})
    return out


def mib(n: float) -> str:
    return f"{n / 2**20:.1f}"


def kvpress_mib(s: dict[str, Any]) -> str:
    """kvpress's physical MiB, with what would be left without masked entries / zeroed key
    channels when that differs (AdaKV, DuoAttention, ThinK)."""
    phys, eff = s["kvpress_cache_bytes_mean"], s["kvpress_effective_bytes_mean"]
    return mib(phys) if abs(phys - eff) < 2**16 else f"{mib(phys)} ({mib(eff)} eff.)"


def rich_table(summary: list[dict[str, Any]]) -> Table:
    table = Table(title="kvlab vs kvpress — same cases, same model, same run",
                  caption="time: wall s summed over cases; kvlab/kvpress < 1: kvlab faster "
                          "(context: prefill + compression; answers: question + decoding). "
                          "KV MiB: compressed context cache, mean per case (kvpress: physical; "
                          "eff.: without masked entries / zeroed key channels). same tokens: "
                          "answers with identical token ids.")
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
            s["method"], s["kept"],
            f"{s['kvpress_accuracy']:.3f}", f"{s['kvlab_accuracy']:.3f}",
            f"{s['kvpress_wall_s']:.1f}", f"{s['kvlab_wall_s']:.1f}",
            f"[{'green' if ratio < 1 else 'red'}]{ratio:.2f}x[/]",
            f"{s['kvlab_context_s'] / s['kvpress_context_s']:.2f}x",
            f"{s['kvlab_answers_s'] / s['kvpress_answers_s']:.2f}x",
            kvpress_mib(s), mib(s["kvlab_cache_bytes_mean"]),
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
        f"- aligned settings: observation window {s['window']} (SnapKV, PyramidKV, AdaKV, ThinK), "
        f"pooling kernel {s['kernel']}, PyramidKV beta {s['pyramidkv_beta']:g}, ThinK pruned key "
        f"channels {s['think_ratio']:g}, AdaKV safeguard {s['adakv_safeguard']:g}; kvlab budgets "
        "are kvpress's kept entries per case (`floor(n*f)`, n = context tokens); kvlab prefills "
        + ("the whole context in one chunk, as kvpress" if not s["kvlab_prefill_chunk"]
           else f"in chunks of {s['kvlab_prefill_chunk']} tokens"),
        "- time: wall seconds summed over the cases (context prefill + compression + every "
        "answer); `kvlab/kvpress` < 1 means kvlab was faster",
        "- KV MiB: mean over cases of the bytes the compressed context cache holds (kvpress: "
        "keys + values in the DynamicCache after the pipeline, physical; `eff.`: what would be "
        "left without the entries it masks and the key channels it zeroes; kvlab: keys + values "
        "+ int32 position indices of kept entries + method state such as H2O's scores)",
        "- same tokens: answers whose generated token ids are identical in both libraries",
    ]
    if report.get("skipped"):
        lines.append("- not run: " + "; ".join(f"`{k}` ({v})" for k, v in report["skipped"].items()))
    lines += [
        "",
        "| method | kept | acc kvpress | acc kvlab | time kvpress (s) | time kvlab (s) | "
        "kvlab/kvpress | KV MiB kvpress | KV MiB kvlab | same tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["summary"]:
        lines.append(
            f"| {r['method']} | {r['kept']} "
            f"| {r['kvpress_accuracy']:.3f} | {r['kvlab_accuracy']:.3f} | {r['kvpress_wall_s']:.1f} "
            f"| {r['kvlab_wall_s']:.1f} | {r['time_ratio_kvlab_over_kvpress']:.2f}x "
            f"| {kvpress_mib(r)} | {mib(r['kvlab_cache_bytes_mean'])} "
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
    tasks = sorted({p["task"] for p in report["per_task"]})
    lines += ["", "Accuracy per task (kvpress / kvlab):", "",
              "| method | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for r in report["summary"]:
        cells = [f"{p['kvpress_accuracy']:.2f} / {p['kvlab_accuracy']:.2f}"
                 for p in sorted(report["per_task"], key=lambda p: p["task"]) if p["method"] == r["method"]]
        lines.append(f"| {r['method']} | " + " | ".join(cells) + " |")
    lines += ["", "What ran, shown for the first kept fraction of each method (kvlab budgets per "
              "case: `floor(n*f)` = kvpress's kept entries, n = context tokens; the exact recipe "
              "of every run is in the JSON):", "",
              "| method | kvpress | kvlab | differences left |", "|---|---|---|---|"]
    seen = set()
    for r in report["summary"]:
        if r["name"] in seen:
            continue
        seen.add(r["name"])
        unaligned = [n for n in r["alignment_notes"] if n.startswith("not aligned")]
        notes = "; ".join(filter(None, [r["notes"], *unaligned])) or "-"
        lines.append(f"| {r['name']} | `{r['kvpress_press']}` | `{r['kvlab_recipe']}` | {notes} |")
    if report.get("pyramidkv_budgets"):
        checks = report["pyramidkv_budgets"]
        fell = sum(c["kvpress_fallback"] for c in checks)
        lines += ["", f"PyramidKV layer budgets: kvpress fell back to uniform (SnapKV) budgets in "
                  f"{fell} of {len(checks)} (row, case) pairs; largest per-layer difference between "
                  f"the libraries: {max(c['max_abs_diff'] for c in checks)} (entries per KV head)."]
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
    p.add_argument("--tasks", type=csv(str), default=["niah_single"],
                   help="kvlab task generators (default: niah_single)")
    p.add_argument("--lengths", type=csv(int), default=[1000],
                   help="context lengths in tokens (default: 1000)")
    p.add_argument("--samples", type=int, default=2, help="seeds per task and length (default: 2)")
    p.add_argument("--ratios", type=csv(float), default=[0.5, 0.25, 0.125],
                   help="kept fractions f: kvpress compression_ratio=1-f, kvlab budget = kvpress's "
                        "kept entries; for duo_attention the share of retrieval heads "
                        "(default: 0.5,0.25,0.125)")
    p.add_argument("--methods", type=csv(str), default=list(ALL_METHODS),
                   help=f"subset of {','.join(ALL_METHODS)} (default: every one kvlab has)")
    p.add_argument("--window", "--snapkv-window", dest="window", type=int, default=32,
                   help="observation window of SnapKV, PyramidKV, AdaKV and ThinK on both sides "
                        "(default 32: kvlab's default and ThinK's; kvpress's SnapKV default is 64)")
    p.add_argument("--kernel", type=int, default=5, help="SnapKV/PyramidKV/AdaKV pooling kernel (default 5)")
    p.add_argument("--pyramidkv-beta", type=float, default=20.0,
                   help="PyramidKV steepness beta (default 20, both libraries' default)")
    p.add_argument("--think-ratio", type=float, default=0.5,
                   help="ThinK: share of key channels pruned (default 0.5)")
    p.add_argument("--adakv-safeguard", type=float, default=0.2,
                   help="AdaKV: share of its budget each head keeps at least (default 0.2, kvpress's)")
    p.add_argument("--kvlab-prefill-chunk", type=int, default=0,
                   help="kvlab prefill chunk in tokens (default 0: the whole context in one chunk, "
                        "as kvpress prefills it; kvlab's own default is 1024)")
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
    bad = [m for m in args.methods if m not in ALL_METHODS]
    if bad:
        p.error(f"--methods: unknown {bad}; use {','.join(ALL_METHODS)}")
    if any(not 0 < f < 1 for f in args.ratios):
        p.error("--ratios: kept fractions must lie strictly between 0 and 1")
    if not 0 < args.think_ratio < 1 or not 0 <= args.adakv_safeguard <= 1:
        p.error("--think-ratio must lie in (0, 1) and --adakv-safeguard in [0, 1]")
    if args.samples < 1 or args.threads < 1 or args.window < 1 or args.kernel < 1 or args.kernel % 2 == 0:
        p.error("--samples, --threads and --window must be >= 1; --kernel odd and >= 1")
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
        warm = warmup_case(engine.tokenizer, args.tasks[0])
    longest = max(context_tokens(engine, c.context) for c in [*cases, warm])
    if args.kvlab_prefill_chunk:
        engine.prefill_chunk = args.kvlab_prefill_chunk
    else:  # one chunk, as kvpress's single forward over the context
        engine.prefill_chunk = max(engine.prefill_chunk, longest)
    opt = Options(window=args.window, kernel=args.kernel, pyramid_beta=args.pyramidkv_beta,
                  think_ratio=args.think_ratio, adakv_safeguard=args.adakv_safeguard,
                  num_layers=int(engine.config.num_hidden_layers))
    specs, skipped = method_specs(args.methods, args.ratios, opt, kvlab_declared())
    for name, why in skipped.items():
        console.print(f"[yellow]note:[/] skipping [bold]{name}[/]: {why}")
    for m in specs:
        for note in m.notes:
            console.print(f"[yellow]note:[/] {m.key}: {note}")
    if not specs:
        raise BenchError("no method to run: every selected method was skipped (see the notes above)")
    press_methods = [m.press for m in specs]
    runs: dict[tuple[str, str, str], dict[str, Any]] = {}
    settings = {
        "model_path": str(model_path),
        "threads": args.threads,
        "max_context_length": engine.trained_length,
        "question_prefix": QUESTION_SEPARATOR,
        "calibration_texts": calibration_texts() if any(m.name == "duo_attention" for m in specs) else [],
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
                # every method once on a short case, on both sides
                progress.update(task, description="warm-up (untimed)")
                worker.job([case_for_worker(warm)], press_methods)
                for m in specs:
                    run_kvlab(engine, warm, m)
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

    mismatched = [(c, m) for (side, c, m), r in runs.items() if side == "kvpress"
                  and r.get("context_tokens") != runs[("kvlab", c, m)]["context_tokens"]]
    if mismatched:
        console.print(f"[red]warning:[/] context token counts differ between the libraries for "
                      f"{len(mismatched)} runs, e.g. {mismatched[0]}")
    summary, per_task = summarize(cases, specs, runs)
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
            "window": args.window, "kernel": args.kernel, "pyramidkv_beta": args.pyramidkv_beta,
            "think_ratio": args.think_ratio, "adakv_safeguard": args.adakv_safeguard,
            "kvlab_prefill_chunk": args.kvlab_prefill_chunk,
            "kvlab_prefill_chunk_used": engine.prefill_chunk,
            "budget_rule": "kvlab budget = kvpress kept entries per layer and KV head, "
                           "max(1, int(n * (1 - compression_ratio))), n = context tokens",
        },
        "env": {
            "kvlab": {"kvlab": kvlab.__version__, "transformers": transformers.__version__,
                      "torch": torch.__version__, "python": platform.python_version()},
            "kvpress": worker.hello["env"] if isinstance(worker.hello, dict) else kvpress_env,
        },
        "skipped": skipped,
        "n_cases": len(cases),
        "n_turns": sum(len(c.turns) for c in cases),
        "summary": summary,
        "per_task": per_task,
        "pyramidkv_budgets": pyramid_check(specs, cases, engine, opt),
        "cases": [
            {"id": c.id, "task": c.task, "target_tokens": c.target_tokens,
             "context_tokens": c.meta.get("tokens"), "depth": c.depth,
             "turns": [t.__dict__ for t in c.turns]}
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
    for name, why in skipped.items():
        out.print(f"not run: {name}: {why}")
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

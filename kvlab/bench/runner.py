"""The benchmark runner: recipes x cases x turns, in one of SCBench's shared-context modes.

For each case the reference recipe (``full`` unless ``reference`` says otherwise) runs first;
its answers are the reference of the fidelity metrics of the other recipes on the same case:
token agreement (fraction of positions where a recipe's greedy answer equals the reference's)
and the mean KL(reference || recipe) of the next-token distributions along the reference's
answer, teacher-forced through the recipe's own cache. Lengths that a recipe's context window
cannot hold are refused before any case is built, unless ``allow_overflow`` is set. In
multi-turn mode the history keeps the gold answer of each turn (SCBench), so every recipe sees
the same conversation. Rows of each finished (case, recipe) pair go to the results store at
once: an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column
from rich.text import Text

import kvlab
from kvlab.bench.cases import Case
from kvlab.bench.config import BenchConfig
from kvlab.bench.loaders import load_jsonl, parse_data_item
from kvlab.bench.metrics import score
from kvlab.bench.raw_prompt import RawPromptSession
from kvlab.bench.store import PairKey, ResultStore
from kvlab.bench.tasks import TASKS
from kvlab.errors import InputError, KvlabError, RecipeError
from kvlab.recipe import Recipe, parse_recipe

FULL = "full"
PREFERRED_THREADS = torch.get_num_threads()
"""torch's thread count when kvlab.bench.runner was imported (the bench's idle choice)."""


class BenchInterrupted(KeyboardInterrupt):
    """A benchmark stopped by Ctrl-C (SIGINT); ``kept`` finished (case, recipe) pairs of its
    settings are in the results store of ``directory`` (None: they could not be counted)."""

    def __init__(self, kept: int | None, directory: Path) -> None:
        self.kept, self.directory = kept, directory
        pairs = "the finished (case, recipe) pairs" if kept is None else f"{kept} (case, recipe) pairs"
        self.message = f"interrupted: {pairs} kept in {directory}; rerun the same command to resume"
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class PeakMemory:
    """Peak resident set size (bytes) of this process while the block runs, sampled every
    ``interval`` seconds by a background thread (and at entry and exit)."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._process = psutil.Process()

    def _sample(self) -> None:
        self.peak = max(self.peak, self._process.memory_info().rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def token_agreement(reference: list[int], tokens: list[int]) -> float:
    """Fraction of the reference's positions where ``tokens`` holds the same token."""
    if not reference:
        return 1.0
    return sum(a == b for a, b in zip(reference, tokens)) / len(reference)


def mean_kl(reference_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """Mean over positions of KL(reference || other), in nats; both ``[positions, vocab]``."""
    p = reference_logprobs.exp()
    return float((p * (reference_logprobs - logprobs)).sum(dim=-1).clamp_min(0).mean())


@dataclass
class _Reference:
    tokens: list[list[int]]
    logprobs: list[torch.Tensor]


def build_cases(config: BenchConfig, tokenizer: Any) -> list[tuple[str, Case]]:
    """(family, case) for every task x length x sample (x depth), then the data files (read
    first, so a bad file fails before any case is generated)."""
    loaded = _load_data(config)
    cases: list[tuple[str, Case]] = []
    for task_name in config.tasks:
        task = TASKS[task_name]
        depths: list[float | None] = list(config.depths) if (config.depths and task.uses_depth) else [None]
        for length in config.lengths:
            for index in range(config.samples):
                for depth in depths:
                    cases.append((task.family, task.generate(tokenizer, length, config.seed, index, depth)))
    cases.extend(loaded)
    _check_unique(cases)
    return cases


def _load_data(config: BenchConfig) -> list[tuple[str, Case]]:
    """The cases of the ``--data`` files; a file given twice is refused."""
    cases: list[tuple[str, Case]] = []
    files: dict[tuple[Path, int | None], str] = {}
    for item in config.data:
        path, fmt, length = parse_data_item(item)
        key = (Path(path).resolve(), length)
        if key in files:
            raise InputError(f"data file {path!r} is given twice ({files[key]!r} and {item!r}); "
                             "give each file once")
        files[key] = item
        raw = config.raw_prompt and fmt == "ruler"
        cases.extend(("file", case) for case in load_jsonl(path, fmt, length=length, raw_prompt=raw))
    return cases


def _check_unique(cases: list[tuple[str, Case]]) -> None:
    """Refuse two cases with one id: the store would hold only one of them."""
    seen: set[str] = set()
    for _, case in cases:
        if case.id in seen:
            raise InputError(
                f"case {case.id!r} would run twice: a task, length, depth or data file is "
                "listed twice; list each once"
            )
        seen.add(case.id)


class AverageRemainingColumn(ProgressColumn):
    """Time left at the mean pace since the start (elapsed / completed x remaining). rich's
    own estimate only uses the last 30 s, so with pairs longer than that it stays unknown."""

    def render(self, task: Any) -> Text:
        if task.total is None or not task.completed or task.elapsed is None:
            return Text("ETA -:--:--", style="progress.remaining")
        left = task.elapsed / task.completed * max(0.0, task.total - task.completed)
        return Text(f"ETA {dt.timedelta(seconds=round(left))}", style="progress.remaining")


def bench_progress(console: Console) -> Progress:
    """The bench's progress bar: what runs now, (case, recipe) pairs done of all, time spent,
    time left."""
    # the description (what runs now) is cut to what the other columns (~46 characters)
    # leave, so the counts, the elapsed time and the ETA always stay on one line
    description = Column(no_wrap=True, overflow="ellipsis", min_width=12,
                         max_width=max(12, console.width - 46))
    return Progress(TextColumn("{task.description}", table_column=description),
                    BarColumn(bar_width=12), MofNCompleteColumn(), TimeElapsedColumn(),
                    AverageRemainingColumn(table_column=Column(no_wrap=True, min_width=11)),
                    console=console, transient=False)


def pair_line(done: int, total: int, case_id: str, label: str, rows: list[dict[str, Any]],
              seconds: float | None, width: int = 80) -> str:
    """One line per finished (case, recipe) pair: recipe, case, accuracy over its turns, KV
    memory at the last answer's end, wall time of the pair; the measurements go on a second,
    indented line when the whole does not fit in ``width`` characters."""
    scored = [r["score"] for r in rows if r.get("score") is not None]
    accuracy = f"{sum(scored) / len(scored):.0%}" if scored else "-"
    kv = rows[-1].get("kv_bytes") if rows else None
    memory = "-" if kv is None else f"{kv / 2**20:.1f} MiB"
    took = "-" if seconds is None else f"{seconds:.1f} s"
    head = f"[{done}/{total}] {label}"
    tail = f"{case_id} | acc {accuracy} | KV {memory} | {took}"
    line = f"{head} | {tail}"
    return line if len(line) <= width else f"{head}\n    {tail}"


class BenchRunner:
    """Runs a :class:`BenchConfig` on one engine into one results directory."""

    def __init__(self, config: BenchConfig, engine: kvlab.Engine | None = None,
                 console: Console | None = None) -> None:
        self.config = config
        self.console = console or Console(stderr=True)
        self.engine = engine or kvlab.load(config.model, config.device, config.dtype, progress=False)
        self.reference = config.reference_recipe()
        self.recipes = self._recipes()
        self.check_lengths()  # before the store is opened: a refused run writes nothing
        self.store = ResultStore(config.out)
        self.settings_id = config.settings_id(self.engine.name, str(self.engine.device))
        self.progress: Progress | None = None  # the last run's progress display
        self.last_pair_s: float | None = None  # wall time of the last (case, recipe) pair

    def _recipes(self) -> list[tuple[str, str]]:
        """(canonical, label) pairs, the reference first and once."""
        parsed = self.config.parsed  # each recipe string parsed once, by the config
        self.parsed: dict[str, Recipe] = {self.reference: parsed[self.config.reference]}
        pairs: list[tuple[str, str]] = [(self.reference, self.config.reference)]
        for label in self.config.recipes:
            canonical = str(parsed[label])
            if canonical not in self.parsed:
                self.parsed[canonical] = parsed[label]
                pairs.append((canonical, label))
        return pairs

    def check_lengths(self) -> None:
        """Refuse, before any case is built, a length that some recipe's context window on
        this model cannot hold (unless ``allow_overflow``; lengths are capped in the config)."""
        if self.config.allow_overflow:
            return
        windows = {c: self.engine.context_window(self.parsed[c]) for c, _ in self.recipes}
        for length in sorted(set(self.config.lengths)):
            short = [(c, label) for c, label in self.recipes if windows[c] < length]
            if short:
                raise InputError(self._overflow_message(length, short, windows))

    def _overflow_message(self, length: int, short: list[tuple[str, str]], windows: dict[str, int]) -> str:
        from kvlab.bench.config import describe_length

        named = ", ".join(
            f"'{label}' ({windows[c]} tokens{', the reference' if c == self.reference else ''})"
            for c, label in short
        )
        text = f"length {describe_length(length)} exceeds the context window of " \
               f"{self.engine.name} with recipe(s) {named}"
        if any(c == self.reference for c, _ in short):
            holder = next((label for c, label in self.recipes if windows[c] >= length), None)
            if holder is None:
                trained = self.engine.context_window(Recipe())
                factor = 2 ** math.ceil(math.log2(length / trained))
                holder = f"yarn(factor={factor})"
                try:
                    parse_recipe(holder)
                except RecipeError:  # beyond yarn's largest factor
                    holder = None
            example = f", e.g. --reference '{holder}'" if holder else \
                " (none of the listed recipes holds it, nor yarn at its largest factor)"
            text += ("; the reference recipe runs on every case: choose one that holds the length "
                     f"with --reference RECIPE (config key 'reference'){example}")
        else:
            text += "; drop that length or recipe, or add a position method to the recipe " \
                    "(e.g. 'yarn(factor=2) + ...')"
        return text + "; or pass --allow-overflow (config key 'allow_overflow') to run past the " \
                      "window and measure what happens"

    def pending(self, cases: list[tuple[str, Case]]) -> list[tuple[str, Case, list[tuple[str, str]]]]:
        done = self.store.finished(self.settings_id)
        todo = []
        for family, case in cases:
            missing = [r for r in self.recipes if PairKey(self.settings_id, case.id, r[0]) not in done]
            if missing:
                todo.append((family, case, missing))
        return todo

    def run(self) -> int:
        """Run everything not yet in the store; returns the number of rows written."""
        cases = build_cases(self.config, self.engine.tokenizer)
        todo = self.pending(cases)
        pairs = sum(len(m) for _, _, m in todo)
        skipped = len(cases) * len(self.recipes) - pairs
        if skipped:
            self.console.print(f"resuming: {skipped} (case, recipe) pairs already in {self.store.path}")
        written = 0
        with bench_progress(self.console) as progress:
            self.progress = progress
            bar = progress.add_task("bench", total=pairs)  # known up front: the ETA works
            done = 0
            for family, case, missing in todo:
                for canonical, label, rows in self._run_case(family, case, missing, progress, bar):
                    self.store.add(rows)
                    written += len(rows)
                    done += 1
                    progress.advance(bar)
                    progress.console.print(pair_line(done, pairs, case.id, label, rows,
                                                     self.last_pair_s, self.console.width),
                                           highlight=False)
        return written

    def _run_case(self, family: str, case: Case, missing: list[tuple[str, str]],
                  progress: Progress, bar: Any) -> Iterator[tuple[str, str, list[dict[str, Any]]]]:
        reference: _Reference | None = None
        for canonical, label in self.recipes:
            needed = (canonical, label) in missing
            is_reference = canonical == self.reference
            if not is_reference and not needed:
                continue
            if is_reference or needed:
                progress.update(bar, description=f"{case.task} {case.target_tokens} tok · {label}")
                try:
                    rows, run_reference = self._run_pair(family, case, canonical, label, reference)
                except KvlabError as exc:
                    raise type(exc)(f"case {case.id}, recipe '{label}': {exc}{self._hint(exc)}") from None
                if is_reference:
                    reference = run_reference
                if needed:
                    yield canonical, label, rows

    def _hint(self, exc: KvlabError) -> str:
        if self.config.allow_overflow or "window" not in str(exc):
            return ""
        return (" (kvlab bench: --reference RECIPE chooses the reference recipe, default full; "
                "--allow-overflow runs past the window)")

    def _run_pair(self, family: str, case: Case, canonical: str, label: str,
                  reference: _Reference | None) -> tuple[list[dict[str, Any]], _Reference]:
        started = time.perf_counter()
        engine, config = self.engine, self.config
        is_reference = canonical == self.reference
        rows: list[dict[str, Any]] = []
        own = _Reference([], [])
        with PeakMemory() as memory:
            if case.prompt == "raw":
                session: Any = RawPromptSession(engine, case.context, self.parsed[canonical])
            else:
                session = engine.session(case.context, recipe=self.parsed[canonical], mode=config.mode,
                                         allow_overflow=config.allow_overflow)
            context = session.context_stats
            for t, turn in enumerate(case.turns):
                max_new = config.max_new_tokens or turn.max_new_tokens
                teacher = reference.tokens[t] if (reference is not None and not is_reference) else None
                answer = session.ask(
                    turn.question, answer_prefix=turn.answer_prefix, max_new_tokens=max_new,
                    reference_answer=turn.answers[0] if config.mode == "multi-turn" else None,
                    teacher_tokens=teacher, keep_logprobs=is_reference,
                )
                own.tokens.append(answer.token_ids)
                if answer.logprobs is not None:
                    own.logprobs.append(answer.logprobs)
                agreement = kl = None
                if teacher is not None and reference is not None:
                    agreement = token_agreement(teacher, answer.token_ids)
                    kl = mean_kl(reference.logprobs[t], answer.teacher_logprobs)
                stats = answer.stats
                rows.append({
                    "settings_id": self.settings_id, "model": engine.name, "mode": config.mode,
                    "prompt": case.prompt,
                    "task": case.task, "family": family, "case_id": case.id,
                    "target_tokens": case.target_tokens, "depth": case.depth,
                    "recipe": canonical, "recipe_label": label, "turn": t,
                    "question": turn.question, "gold": json.dumps(turn.answers),
                    "prediction": answer.text, "metric": turn.metric,
                    "score": score(turn.metric, answer.text, turn.answers),
                    "token_agreement": agreement, "kl": kl,
                    "context_tokens": context.prompt_tokens, "prompt_tokens": stats.prompt_tokens,
                    "new_tokens": stats.new_tokens, "kv_tokens": stats.kv_tokens,
                    "kv_bytes": stats.kv_bytes, "context_kv_bytes": context.kv_bytes,
                    "context_prefill_s": context.prefill_s, "prefill_s": stats.prefill_s,
                    "decode_s": stats.decode_s, "decode_s_per_token": stats.decode_s_per_token,
                    "peak_rss_bytes": None, "device": str(engine.device),
                    "reference": self.reference,
                })
        for row in rows:
            row["peak_rss_bytes"] = memory.peak
        self.last_pair_s = time.perf_counter() - started
        return rows, own


def _record(runner: BenchRunner, **extra: Any) -> None:
    """The run's settings, model, dtype, device and threads into the directory's run.json
    (the report's run details)."""
    from kvlab.bench.report import record_run

    engine = runner.engine
    dtype = next(engine.model.parameters()).dtype
    details = {**runner.config.as_dict(), "model": engine.name, "device": str(engine.device),
               "dtype": str(dtype).removeprefix("torch."), "torch_threads": torch.get_num_threads(),
               **extra}
    record_run(runner.config.out, runner.settings_id, details)


def threads_for_load(console: Console, preferred: int) -> None:
    """Torch threads for the whole run, chosen once at its start (so every pair of a run, and
    so every recipe, is timed with the same threads): one while other jobs keep the cores busy
    (the 1-minute load average less this run's own threads leaves no core for them), else
    ``preferred`` (torch's own choice), unless the user chose (``OMP_NUM_THREADS``). Measured
    on the shared 2-core machine at load ~8: 6.4 s per pair with one thread against 30 s with
    two threads waiting on each other. Each change is said on the console; run.json records
    the threads."""
    if os.environ.get("OMP_NUM_THREADS") or preferred <= 1:
        return
    load, cores, now = os.getloadavg()[0], os.cpu_count() or 1, torch.get_num_threads()
    others = max(0.0, load - now)  # this run's threads count in the load while it computes
    spare = cores - preferred  # cores left for other jobs when torch uses its own choice
    if now != 1 and others >= spare + 1:
        want = 1
    elif now == 1 and others < spare + 0.5:  # a margin, so the choice does not flip each pair
        want = preferred
    else:
        return
    if want != now:
        torch.set_num_threads(want)
        console.print(f"machine busy (load average {load:.1f} on {cores} cores): torch runs 1 "
                      "thread (set OMP_NUM_THREADS to choose)" if want == 1 else
                      f"load average down to {load:.1f} on {cores} cores: torch runs {want} "
                      "threads again", highlight=False)


def run_bench(config: BenchConfig, engine: kvlab.Engine | None = None,
              console: Console | None = None, report: bool = True) -> Path:
    """Run ``config``; print the summary; write the HTML report. Returns the results dir."""
    console = console or Console(stderr=True)
    started = time.time()
    threads_for_load(console, PREFERRED_THREADS)
    runner = BenchRunner(config, engine, console)
    _record(runner, started=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            load_average_start=list(os.getloadavg()))
    try:
        try:
            written = runner.run()
        except KeyboardInterrupt:
            runner.store.close()  # an unfinished pair's transaction is rolled back, never kept
            raise BenchInterrupted(kept_pairs(config.out, runner.settings_id), Path(config.out)) from None
        _record(runner, finished=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                wall_s=round(time.time() - started, 1), load_average=list(os.getloadavg()))
        console.print(f"{written} rows written to {runner.store.path} "
                      f"({runner.store.count()} rows stored)")
        console.print(f"fidelity reference: {config.reference}", highlight=False)
        rows = runner.store.rows()
    finally:
        runner.store.close()
    from kvlab.bench.summary import summary_table

    terminal = Console()
    if not terminal.is_terminal:
        terminal = Console(width=160)
    terminal.print(summary_table(rows, width=terminal.width))
    if report:
        from kvlab.bench.report import build_report

        path = build_report(config.out)
        console.print(f"report: {path}")
    return Path(config.out)


def kept_pairs(directory: str | Path, settings_id: str) -> int | None:
    """Finished (case, recipe) pairs of ``settings_id`` in the store (None: unreadable)."""
    try:
        with ResultStore(directory) as store:
            return len(store.finished(settings_id))
    except Exception:  # noqa: BLE001 - the count is a courtesy; the interrupt is what matters
        return None

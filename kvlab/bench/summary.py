"""Aggregates of the results table: one line per (model, mode, recipe), every number with a unit.

:func:`summarize` reduces the rows of :class:`~kvlab.bench.store.ResultStore` (one per case x
recipe x turn) to one dict per (model, mode, recipe); :func:`summary_table` renders those for
the terminal. :data:`SUMMARY_COLUMNS` (header with unit, formatter) is shared with the HTML
report so both show the same numbers the same way.

Only measured values are aggregated; a mean over no values is ``None`` and shows as ``-``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table

FULL = "full"
MIB = 2**20


def _mean(values: Iterable[float | int | None]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def _max(values: Iterable[float | int | None]) -> float | None:
    kept = [float(v) for v in values if v is not None]
    return max(kept) if kept else None


def wilson_interval(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95 % for ``z=1.96``) of a proportion ``p`` seen on ``n``
    trials, as (low, high) in 0..1; the whole range 0..1 when ``n`` is 0. Scores that are not
    0/1 (partial credit) are treated as a proportion of the same ``n``: an approximation."""
    if n <= 0:
        return 0.0, 1.0
    p = min(max(p, 0.0), 1.0)
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def recipe_order(rows: Iterable[dict[str, Any]]) -> list[str]:
    """Recipes in the order they were run (earliest ``created_at`` of their rows, when the rows
    carry one; else first appearance), ``full`` first when present."""
    seen: dict[str, Any] = {}
    for row in rows:
        created = row.get("created_at")
        if row["recipe"] not in seen:
            seen[row["recipe"]] = created
        elif created is not None and (seen[row["recipe"]] is None or created < seen[row["recipe"]]):
            seen[row["recipe"]] = created
    order = list(seen)
    if all(v is not None for v in seen.values()):
        order.sort(key=lambda r: seen[r])  # stable: ties keep first appearance
    if FULL in seen:
        order.remove(FULL)
        order.insert(0, FULL)
    return order


def first_seen(rows: Iterable[dict[str, Any]], key: str) -> list[Any]:
    """Distinct values of ``key`` in order of first appearance."""
    return list(dict.fromkeys(row.get(key) for row in rows))


def recipe_labels(rows: Iterable[dict[str, Any]]) -> dict[str, str]:
    """The name to show for each recipe: the user's spelling when it is unambiguous (one label
    per recipe and no two recipes sharing one), else the canonical string."""
    labels: dict[str, set[str]] = {}
    for row in rows:
        labels.setdefault(row["recipe"], set()).add(row.get("recipe_label") or row["recipe"])
    chosen = {r: (next(iter(ls)) if len(ls) == 1 else r) for r, ls in labels.items()}
    if len(set(chosen.values())) < len(chosen):
        return {r: r for r in chosen}
    return chosen


def _case_key(row: dict[str, Any]) -> tuple[Any, Any]:
    return row.get("settings_id"), row["case_id"]


def _full_kv(rows: Iterable[dict[str, Any]]) -> dict[tuple[Any, Any, Any], float]:
    """kv_bytes of every ``full`` row, by (settings, case, turn)."""
    return {
        (*_case_key(r), r["turn"]): r["kv_bytes"]
        for r in rows
        if r["recipe"] == FULL and r.get("kv_bytes")
    }


def _context_prefill(rows: list[dict[str, Any]]) -> float | None:
    """Mean over cases of the context prefill time (a case's context is prefilled once: its
    value is taken from the earliest turn that has one)."""
    per_case: dict[tuple[Any, Any], tuple[int, float]] = {}
    for r in rows:
        value = r.get("context_prefill_s")
        if value is None:
            continue
        key = _case_key(r)
        if key not in per_case or r["turn"] < per_case[key][0]:
            per_case[key] = (r["turn"], value)
    return _mean(v for _, v in per_case.values())


def summarize(rows: list[dict[str, Any]], by: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One dict per (model, mode, recipe) (and per value of each column in ``by``, e.g.
    ``by=("target_tokens",)``), ordered by model and mode of first appearance, then recipe
    (:func:`recipe_order`), then ``by`` values ascending.

    Keys: model, mode, recipe, label (display name), the ``by`` columns, n_cases, n_rows,
    accuracy (mean score, 0..1), accuracy_by_turn (mean score per turn over the cases with more
    than one turn, a list indexed by turn, empty without such cases; ``None`` for a turn
    without rows), token_agreement (mean, 0..1; ``None`` for full), kl (mean, nats; ``None``
    for full), kv_mib (mean kv_bytes / 2**20), kv_ratio (mean over rows with a ``full`` row of
    the same settings, case and turn of kv_bytes / that row's kv_bytes; ``None`` without such
    rows), context_prefill_s (mean over cases, s), decode_ms_per_token (mean over rows that
    generated tokens, ms), peak_rss_mib (max, MiB), accuracy_ci (the 95 % Wilson interval of
    accuracy over n_scored rows, (low, high) in 0..1; ``None`` without scores),
    accuracy_by_turn_n (scored rows per turn).
    """
    if not rows:
        return []
    models = {m: i for i, m in enumerate(first_seen(rows, "model"))}
    modes = {m: i for i, m in enumerate(first_seen(rows, "mode"))}
    recipes = {r: i for i, r in enumerate(recipe_order(rows))}
    labels = recipe_labels(rows)
    full_kv = _full_kv(rows)

    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        key = (row["model"], row["mode"], row["recipe"], *(row.get(k) for k in by))
        groups.setdefault(key, []).append(row)

    def order(key: tuple[Any, ...]) -> tuple[Any, ...]:
        extra = tuple((v is None, v if v is not None else 0) for v in key[3:])
        return (models[key[0]], modes[key[1]], recipes[key[2]], *extra)

    out = []
    for key in sorted(groups, key=order):
        group = groups[key]
        model, mode, recipe = key[:3]
        is_full = recipe == FULL
        last: dict[tuple[Any, Any], int] = {}
        for r in group:
            last[_case_key(r)] = max(last.get(_case_key(r), 0), r["turn"])
        multi = [r for r in group if last[_case_key(r)] > 0]  # cases with several turns
        turns = max((r["turn"] for r in multi), default=-1) + 1
        by_turn = [_mean(r["score"] for r in multi if r["turn"] == t) for t in range(turns)]
        by_turn_n = [sum(1 for r in multi if r["turn"] == t and r["score"] is not None)
                     for t in range(turns)]
        scored = [float(r["score"]) for r in group if r["score"] is not None]
        accuracy = sum(scored) / len(scored) if scored else None
        ratios = [
            r["kv_bytes"] / full_kv[(*_case_key(r), r["turn"])]
            for r in group
            if r.get("kv_bytes") is not None and (*_case_key(r), r["turn"]) in full_kv
        ]
        decode = [
            r["decode_s_per_token"] * 1000
            for r in group
            if r.get("decode_s_per_token") is not None and r.get("new_tokens") != 0
        ]
        kv = _mean(r.get("kv_bytes") for r in group)
        rss = _max(r.get("peak_rss_bytes") for r in group)
        summary: dict[str, Any] = {
            "model": model,
            "mode": mode,
            "recipe": recipe,
            "label": labels[recipe],
            **dict(zip(by, key[3:])),
            "n_cases": len({_case_key(r) for r in group}),
            "n_rows": len(group),
            "accuracy": accuracy,
            "n_scored": len(scored),
            "accuracy_ci": None if accuracy is None else wilson_interval(accuracy, len(scored)),
            "accuracy_by_turn": by_turn,
            "accuracy_by_turn_n": by_turn_n,
            "token_agreement": None if is_full else _mean(r.get("token_agreement") for r in group),
            "kl": None if is_full else _mean(r.get("kl") for r in group),
            "kv_mib": None if kv is None else kv / MIB,
            "kv_ratio": _mean(ratios),
            "context_prefill_s": _context_prefill(group),
            "decode_ms_per_token": _mean(decode),
            "peak_rss_mib": None if rss is None else rss / MIB,
        }
        out.append(summary)
    return out


# --- presentation -------------------------------------------------------------------------

def _fixed(digits: int, scale: float = 1.0) -> Callable[[Any], str]:
    return lambda v: f"{v * scale:,.{digits}f}"


def adaptive_number(v: float) -> str:
    """Three significant digits without switching to exponent notation for usual sizes."""
    a = abs(v)
    if a == 0:
        return "0"
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    if a >= 0.001:
        return f"{v:.3f}"
    return f"{v:.1e}"


def _interval(values: tuple[float, float]) -> str:
    low, high = values
    return f"{low * 100:.0f}-{high * 100:.0f}"


def _turns(values: list[float | None]) -> str:
    if not values:
        return "-"
    return " / ".join("-" if v is None else f"{v * 100:.0f}" for v in values)


@dataclass(frozen=True)
class SummaryColumn:
    """One column of the summary: the key in a :func:`summarize` dict, its header (with the
    unit) and how a value is written (``None`` is always ``-``)."""

    key: str
    header: str
    fmt: Callable[[Any], str]
    numeric: bool = True

    def cell(self, summary: dict[str, Any]) -> str:
        value = summary.get(self.key)
        return "-" if value is None else self.fmt(value)


SUMMARY_COLUMNS: tuple[SummaryColumn, ...] = (
    SummaryColumn("model", "model", str, numeric=False),
    SummaryColumn("mode", "mode", str, numeric=False),
    SummaryColumn("label", "recipe", str, numeric=False),
    SummaryColumn("n_cases", "cases (n)", lambda v: f"{v:,}"),
    SummaryColumn("n_rows", "rows (n)", lambda v: f"{v:,}"),
    SummaryColumn("accuracy", "acc (%)", _fixed(1, 100)),
    SummaryColumn("accuracy_ci", "95% CI (%)", _interval),
    SummaryColumn("accuracy_by_turn", "acc per turn (%)", _turns),
    SummaryColumn("kv_mib", "KV (MiB)", adaptive_number),
    SummaryColumn("kv_ratio", "KV vs full (x)", _fixed(2)),
    SummaryColumn("token_agreement", "token agree (%)", _fixed(1, 100)),
    SummaryColumn("kl", "KL (nats)", adaptive_number),
    SummaryColumn("context_prefill_s", "prefill (s)", adaptive_number),
    SummaryColumn("decode_ms_per_token", "decode (ms/tok)", adaptive_number),
    SummaryColumn("peak_rss_mib", "peak RSS (MiB)", _fixed(0)),
)


def visible_columns(summaries: list[dict[str, Any]]) -> list[SummaryColumn]:
    """The columns worth showing: model / mode only when there are several, the per-turn
    accuracy only when some recipe has more than one turn."""
    shown = []
    for column in SUMMARY_COLUMNS:
        if column.key in ("model", "mode") and len({s[column.key] for s in summaries}) < 2:
            continue
        if column.key == "accuracy_by_turn" and all(
            len(s["accuracy_by_turn"]) < 2 for s in summaries
        ):
            continue
        shown.append(column)
    return shown


RECIPE_WIDTH = 24
"""Widest the terminal's recipe column gets; a longer recipe name wraps onto more lines."""


def _terminal_table(summaries: list[dict[str, Any]], columns: list[SummaryColumn],
                    title: str | None) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in columns:
        if column.key == "label":  # never dropped, never squeezed below its longest word
            longest = max((len(w) for s in summaries for w in column.cell(s).split()), default=6)
            table.add_column(column.header, justify="left", overflow="fold",
                             min_width=min(RECIPE_WIDTH, max(6, longest)), max_width=RECIPE_WIDTH)
        else:
            # numbers and headers never wrap or get cut: a table that does not fit is split
            table.add_column(_stack(column.header) if column.numeric else column.header,
                             justify="right" if column.numeric else "left", no_wrap=True)
    for summary in summaries:
        table.add_row(*(column.cell(summary) for column in columns))
    return table


def _width(table: Table) -> int:
    from rich.console import Console

    console = Console(width=100_000, file=io.StringIO(), color_system=None)
    return console.measure(table).maximum


def summary_tables(rows: list[dict[str, Any]], width: int | None = None,
                   title: str | None = None) -> list[Table]:
    """The :func:`summarize` lines as rich tables (headers carry the units, stacked on short
    lines to keep the numeric columns narrow). Everything in one table when it fits in
    ``width`` characters (``None``: no limit); else the columns are split over several tables
    that each start with the recipe column, so no column is dropped or cut."""
    summaries = summarize(rows)
    if title is None:
        models = ", ".join(str(m) for m in first_seen(rows, "model"))
        modes = ", ".join(str(m) for m in first_seen(rows, "mode"))
        title = f"results: {models} ({modes})" if rows else "results: no rows"
    columns = visible_columns(summaries)
    if width is None:
        return [_terminal_table(summaries, columns, title)]
    keys = [c for c in columns if c.key in ("model", "mode", "label")]
    rest = [c for c in columns if c not in keys]
    groups: list[list[SummaryColumn]] = []
    current: list[SummaryColumn] = []
    for column in rest:
        trial = _terminal_table(summaries, keys + current + [column], title)
        if current and _width(trial) > width:
            groups.append(current)
            current = []
        current.append(column)
    if current or not groups:
        groups.append(current)
    tables = []
    for i, group in enumerate(groups):
        part = title if len(groups) == 1 else f"{title}, part {i + 1} of {len(groups)}"
        tables.append(_terminal_table(summaries, keys + group, part))
    return tables


def summary_table(rows: list[dict[str, Any]], title: str | None = None,
                  width: int | None = None) -> RenderableType:
    """:func:`summary_tables` as one printable: a table, or a group of tables when the
    columns do not fit in ``width``."""
    tables = summary_tables(rows, width, title)
    return tables[0] if len(tables) == 1 else Group(*tables)


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    """The :func:`summarize` lines as a Markdown table (same columns and numbers as the
    terminal table), for pasting into notes and READMEs."""
    summaries = summarize(rows)
    columns = visible_columns(summaries)
    lines = [
        "| " + " | ".join(c.header for c in columns) + " |",
        "|" + "|".join("---:" if c.numeric else "---" for c in columns) + "|",
    ]
    for summary in summaries:
        lines.append("| " + " | ".join(c.cell(summary).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _stack(header: str) -> str:
    """A header on short lines: the unit alone on the last one, long names split in two."""
    name, _, unit = header.partition(" (")
    words = name.split()
    if len(name) > 8 and len(words) > 1:
        name = " ".join(words[:-1]) + "\n" + words[-1]
    return f"{name}\n({unit}" if unit else name

"""Time vs context length: the ``speed`` rows of ``benchmarks/speed.py``, summarised and drawn.

- :func:`summarise`: per run, the median of every (length, variant) over its repeats, with the
  physical bounds and the ratios to kvlab ``full`` and to plain ``transformers`` (measured in the
  same interleaved run);
- :func:`time_figure`: prefill seconds and decode ms per token against context length, log-log,
  one line per variant, its bound dotted in the same colour;
- :func:`markdown` and :func:`time_section`: the table as Markdown (``speed.md``) and the
  report's "Time vs length" section (figure + table per run).

Every time shown is a wall-clock median; every bound is computed from bytes and FLOPs the run
counted and rates it measured (labelled as bounds).
"""

from __future__ import annotations

from statistics import median
from typing import Any

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import LogLocator, NullFormatter, NullLocator, StrMethodFormatter

from kvlab.bench.lengths import format_length
from kvlab.bench.report_context import Rows, escape, note, recipe_styles, subheading

PLAIN, FULL = "transformers", "full"
MiB = 2**20


def runs(rows: Rows) -> list[tuple[str, Rows]]:
    """(run id, its rows) per run, in the order stored."""
    by_run: dict[str, Rows] = {}
    for row in rows:
        by_run.setdefault(str(row["run_id"]), []).append(row)
    return list(by_run.items())


def variants(rows: Rows) -> list[str]:
    """transformers, full, then the recipes in the order they were run."""
    seen = list(dict.fromkeys(r["variant"] for r in rows))
    first = [v for v in (PLAIN, FULL) if v in seen]
    return first + [v for v in seen if v not in first]


def summarise(rows: Rows) -> Rows:
    """Medians per (length, variant) of one run's rows, with bounds and ratios (``None`` where
    the run has no ``full`` or no ``transformers`` at that length)."""
    out: Rows = []
    for length in sorted({r["context_length"] for r in rows}):
        here = [r for r in rows if r["context_length"] == length]
        medians: dict[str, dict[str, Any]] = {}
        for variant in variants(here):
            picked = [r for r in here if r["variant"] == variant]
            row = {"context_length": length, "variant": variant, "n": len(picked),
                   "position": picked[0].get("position"), "recipe": picked[0].get("recipe")}
            for key in ("prefill_s", "decode_ms_per_token", "kv_bytes", "prefill_bound_s",
                        "decode_bound_ms_per_token"):
                row[key] = median(r[key] for r in picked)
            medians[variant] = row
            out.append(row)
        for row in medians.values():
            for base, suffix in ((FULL, "full"), (PLAIN, "transformers")):
                ref = medians.get(base)
                row[f"prefill_vs_{suffix}"] = row["prefill_s"] / ref["prefill_s"] if ref else None
                row[f"decode_vs_{suffix}"] = (
                    row["decode_ms_per_token"] / ref["decode_ms_per_token"] if ref else None)
    return out


def describe(rows: Rows) -> str:
    """One run's machine and settings, in one sentence."""
    first = rows[0]
    loads = [r["load_average"] for r in rows if r.get("load_average") is not None]
    load = f"{min(loads):.2f}-{max(loads):.2f}" if loads else "not recorded"
    return (
        f"{first['model']} {first['dtype']} on {first['device']} ({first['threads']} torch "
        f"threads); 1-minute load average {load} during the run; memory bandwidth "
        f"{first['memory_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s and matmul "
        f"{first['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s, both measured in the run; "
        f"{first['new_tokens']} decoding step{'s' if first['new_tokens'] != 1 else ''} timed per "
        "variant."
    )


def positions_added(rows: Rows) -> str | None:
    """Which position method was added past the model's window, per length, if any."""
    added = dict.fromkeys((r["context_length"], r["position"]) for r in rows if r.get("position"))
    if not added:
        return None
    return "; ".join(f"{format_length(n)}: {p}" for n, p in added)


def display_name(row: dict[str, Any]) -> str:
    """The variant, with the position method added past the window (a recipe that kept its
    own position method shows as run)."""
    position = row.get("position")
    if not position:
        return str(row["variant"])
    if row["variant"] in (PLAIN, FULL) or not row.get("recipe"):
        return f"{row['variant']} + {position}"
    return str(row["recipe"])


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown(summary: Rows) -> str:
    """The summary as a Markdown table (``benchmarks/results/speed.md``)."""
    lines = [
        "| length | variant | prefill (s) | vs full | vs transformers | prefill bound (s) "
        "| decode (ms/token) | vs full | vs transformers | decode bound (ms/token) | KV (MiB) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary:
        name = display_name(r)
        lines.append(
            f"| {format_length(r['context_length'])} | `{name}` | {r['prefill_s']:.3f} | "
            f"{_ratio(r['prefill_vs_full'])} | {_ratio(r['prefill_vs_transformers'])} | "
            f"{r['prefill_bound_s']:.3f} | {r['decode_ms_per_token']:.1f} | "
            f"{_ratio(r['decode_vs_full'])} | {_ratio(r['decode_vs_transformers'])} | "
            f"{r['decode_bound_ms_per_token']:.2f} | {r['kv_bytes'] / MiB:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _wrap(label: str, width: int = 28) -> str:
    """A legend label cut at '; ' / ', ' so that no line is wider than ``width``."""
    if len(label) <= width:
        return label
    parts, line = [], ""
    for word in label.replace(", ", ",\u0000").split("\u0000"):
        if line and len(line) + len(word) > width:
            parts.append(line)
            line = ""
        line += word + " " if word.endswith(",") else word
    parts.append(line)
    return "\n".join(p.strip() for p in parts)


def time_figure(summary: Rows) -> Figure:
    """Prefill and decode time against context length (log-log), one line per variant with
    its physical bound dotted in the same colour."""
    names = variants(summary)
    colours, markers = recipe_styles(names)
    fig = Figure(figsize=(11, 5.2), layout="constrained")
    axes = fig.subplots(1, 2)
    lengths = sorted({r["context_length"] for r in summary})
    panels = (
        (axes[0], "prefill_s", "prefill_bound_s", "Prefill", "seconds (log scale)"),
        (axes[1], "decode_ms_per_token", "decode_bound_ms_per_token", "Decode",
         "ms per token (log scale)"),
    )
    for ax, key, bound, title, unit in panels:
        for name in names:
            mine = sorted((r for r in summary if r["variant"] == name),
                          key=lambda r: r["context_length"])
            x = [r["context_length"] for r in mine]
            ax.plot(x, [r[key] for r in mine], marker=markers[name], color=colours[name],
                    label=_wrap(name))
            ax.plot(x, [r[bound] for r in mine], ":", marker="_", markersize=12,  # seen at one length too
                    color=colours[name], linewidth=1.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(lengths, [format_length(n) for n in lengths])
        ax.xaxis.set_minor_locator(NullLocator())
        # 1-2-3-5 ticks with plain numbers: readable even when the times span less than a decade
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
        ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("context length (tokens, log scale)")
        ax.set_ylabel(unit)
        ax.set_title(f"{title} (dotted: physical bound)")
        ax.grid(True, which="major", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    handles.append(Line2D([], [], linestyle=":", marker="_", markersize=12, color="#555555", linewidth=1.2))
    labels.append("bound (dotted,\nvariant's colour)")
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(names), 4),
               fontsize=10, frameon=False)
    return fig


def _table(summary: Rows) -> str:
    head = ("<tr><th class='num'>length</th><th class='txt'>variant</th>"
            "<th class='num'>prefill (s)</th><th class='num'>vs full</th>"
            "<th class='num'>vs trans&shy;formers</th><th class='num'>bound (s)</th>"
            "<th class='num'>decode (ms/token)</th><th class='num'>vs full</th>"
            "<th class='num'>vs trans&shy;formers</th><th class='num'>bound (ms/token)</th>"
            "<th class='num'>KV (MiB)</th><th class='num'>n</th></tr>")
    body = []
    for r in summary:
        name = escape(r["variant"])
        if r.get("position"):
            name += f"<br><span class='n'>+ {escape(r['position'])}</span>"
        cells = [
            format_length(r["context_length"]), None, f"{r['prefill_s']:.3f}",
            _ratio(r["prefill_vs_full"]), _ratio(r["prefill_vs_transformers"]),
            f"{r['prefill_bound_s']:.3f}", f"{r['decode_ms_per_token']:.1f}",
            _ratio(r["decode_vs_full"]), _ratio(r["decode_vs_transformers"]),
            f"{r['decode_bound_ms_per_token']:.2f}", f"{r['kv_bytes'] / MiB:.1f}", str(r["n"]),
        ]
        tds = "".join(f"<td class='txt'><code>{name}</code></td>" if c is None
                      else f"<td class='num'>{escape(c)}</td>" for c in cells)
        body.append(f"<tr>{tds}</tr>")
    return f"<table class='speed'>{head}{''.join(body)}</table>"


CAPTION = (
    "Wall-clock medians over the repeats, every variant measured on the same prompt in one "
    "interleaved run. Dotted lines are bounds, not measurements: a decoding step cannot take "
    "less than (weight bytes + KV bytes) / memory bandwidth, a prefill less than its matmul "
    "FLOPs / matmul FLOP/s. transformers: the same model and dtype with SDPA attention and "
    "its DynamicCache (the floor of kvlab's engine overhead)."
)


def time_section(rows: Rows) -> str:
    """The report's "Time vs length" section: per run, a figure and the table."""
    from kvlab.bench.plots import embed_figure

    parts = []
    all_runs = runs(rows)
    for run_id, mine in reversed(all_runs):  # newest first
        summary = summarise(mine)
        title = f"run {run_id}" if len(all_runs) > 1 else None
        parts.append(subheading(title))
        parts.append(note(describe(mine)))
        added = positions_added(mine)
        if added:
            parts.append(note("Past the model's window the kvlab variants ran with a position "
                              f"method added: {added}."))
        parts.append(embed_figure(time_figure(summary), "time vs context length", CAPTION))
        parts.append(_table(summary))
    return "\n".join(parts)


__all__ = ["describe", "markdown", "positions_added", "runs", "summarise", "time_figure",
           "time_section", "variants"]

"""Perplexity-by-position curves and tables of a ``kvlab ppl`` store, for benchmarks/README.md.

The HTML report (``kvlab report STORE``) draws the same figures inline; this script writes them
as files a Markdown page can show: one ``ppl_<length>.png`` per document length in the store,
with every recipe measured at that length (the figure of :func:`kvlab.bench.ppl_report.ppl_figure`:
perplexity per 1k-token bin against position, log scale, the model's window dashed), and
prints per length two Markdown tables: the targets' summary (the report's table) and the
perplexity of every bin.

    python benchmarks/ppl_curves.py benchmarks/results/ppl-store --out benchmarks/results
"""

from __future__ import annotations

import argparse
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg

from kvlab.bench.lengths import format_length
from kvlab.bench.ppl_report import documents, ppl_figure, summary, trained_window
from kvlab.bench.report_context import Rows
from kvlab.bench.store import ResultStore


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _ppl(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _span(start: int, end: int) -> str:
    """``7k-8k`` for 1k-aligned bins, else ``448-512``."""
    if start % 1024 == 0 and end % 1024 == 0:
        return f"{start // 1024}k-{end // 1024}k"
    return f"{start}-{end}"


def _bin(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def markdown_tables(recipes: dict[str, Rows], trained: int) -> str:
    """The summary table (in-window bin, last bin, their ratios, mean NLL, time, load) and
    the per-bin table of one document length, as Markdown."""
    first = next(iter(recipes.values()))
    inside = summary(first, trained)["inside_bin"]
    where = f"bin {_span(*inside)}" if inside else "in-window bin"
    lines = [
        f"| recipe | window (tokens) | ppl, {where} | ppl, last bin | ppl, window | last / {where} "
        "| last / window | mean NLL (nats/token) | time (s) | load |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, bins in recipes.items():
        s = summary(bins, trained)
        lines.append(
            f"| `{name}` | {int(bins[0]['context_window']):,} | {_ppl(s['inside'])} | {s['last']:.2f} | "
            f"{_ppl(s['window_ppl'])} | {_ratio(s['ratio'])} | {_ratio(s['window_ratio'])} | "
            f"{s['mean_nll']:.3f} | {s['seconds']:.0f} | {s['load']:.1f} |"
        )
    heads = [_span(r["bin_start"], r["bin_end"]) for r in first]
    lines += ["", "| recipe | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(heads)]
    for name, bins in recipes.items():
        lines.append(f"| `{name}` | " + " | ".join(_bin(r["perplexity"]) for r in bins) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path, help="a kvlab results directory with perplexity rows")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                        help="directory of the PNG files (default: benchmarks/results)")
    args = parser.parse_args()
    with ResultStore(args.store, read_only=True) as store:
        rows = store.perplexity_rows()
    if not rows:
        raise SystemExit(f"{args.store} holds no perplexity rows (run `kvlab ppl --out {args.store}`)")
    args.out.mkdir(parents=True, exist_ok=True)
    for (model, length), recipes in documents(rows):
        trained = trained_window([r for r in rows if r["model"] == model])
        fig = ppl_figure(recipes, length, trained)
        FigureCanvasAgg(fig)
        path = args.out / f"ppl_{format_length(length)}.png"
        fig.savefig(path, dpi=100, facecolor="white")
        print(f"wrote {path} ({len(recipes)} recipes, {model})\n")
        print(markdown_tables(recipes, trained) + "\n")


if __name__ == "__main__":
    main()

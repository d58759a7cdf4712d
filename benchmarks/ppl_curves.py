"""Perplexity-by-position curves of a ``kvlab ppl`` store as PNG files, for benchmarks/README.md.

The HTML report (``kvlab report STORE``) draws the same figures inline; this script writes them
as files a Markdown page can show: one ``ppl_<length>.png`` per document length in the store,
with every recipe measured at that length (the figure of :func:`kvlab.bench.ppl_report.ppl_figure`:
perplexity per 1k-token bin against position, log scale, the model's window dashed).

    python benchmarks/ppl_curves.py benchmarks/results/ppl-store --out benchmarks/results
"""

from __future__ import annotations

import argparse
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg

from kvlab.bench.lengths import format_length
from kvlab.bench.ppl_report import documents, ppl_figure, trained_window
from kvlab.bench.store import ResultStore


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
        print(f"wrote {path} ({len(recipes)} recipes, {model})")


if __name__ == "__main__":
    main()

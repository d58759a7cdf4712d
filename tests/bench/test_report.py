"""build_report on tiny synthetic stores: sections, embedded plots, missing pieces, escaping."""

from __future__ import annotations

import html
import re
import shutil
import subprocess

import pytest

from kvlab.bench.report import SECTIONS, build_report, pareto_front
from kvlab.errors import InputError
from tests.bench.test_summary import synthetic_pairs, write_store

IMG = '<img src="data:image/png;base64,'


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("bench")
    write_store(directory, synthetic_pairs(model="org/<tiny>&model"))
    path = build_report(directory)
    assert path == directory / "report.html"
    return path.read_text(encoding="utf-8")


def test_report_has_every_section_and_embedded_plots(page):
    for title in SECTIONS.values():
        assert f">{html.escape(title)}</h2>" in page
    # accuracy vs KV, per turn, needle heat maps, speed and memory, fidelity
    assert page.count(IMG) >= 5
    assert 'alt="needle heat maps"' in page and 'alt="accuracy per turn"' in page
    for header in ("acc (%)", "KV (MiB)", "KV vs full (x)", "KL (nats)", "peak RSS (MiB)"):
        assert f">{header}</th>" in page
    assert "niah_single" in page and "kv_retrieval" in page and "1,000, 2,000" in page


def test_report_is_self_contained_and_escaped(page):
    assert "<script" not in page.lower()
    assert not re.search(r'(src|href)="(?!data:|#)', page)  # no external asset or link
    assert "org/&lt;tiny&gt;&amp;model" in page
    assert "<tiny>" not in page


def test_report_copes_with_one_recipe_no_depths_no_full(tmp_path):
    pairs = [rows for rows in synthetic_pairs() if rows[0]["recipe"].startswith("snapkv")
             and rows[0]["depth"] is None and rows[0]["target_tokens"] == 1000]
    write_store(tmp_path, pairs)
    out = tmp_path / "sub" / "page.html"
    assert build_report(tmp_path, out) == out
    page = out.read_text(encoding="utf-8")
    assert "No needle rows" in page
    assert 'alt="needle heat maps"' not in page
    assert "no full baseline" in page  # accuracy vs KV falls back to absolute MiB
    assert page.count(IMG) == 4  # accuracy vs KV, per turn, speed and memory, fidelity
    for title in SECTIONS.values():
        assert f">{html.escape(title)}</h2>" in page


def test_missing_or_empty_store_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no results store"):
        build_report(tmp_path / "nowhere")
    write_store(tmp_path, [])
    with pytest.raises(InputError, match="no results"):
        build_report(tmp_path)


def test_pareto_front():
    points = [(1.0, 90.0), (0.25, 70.0), (0.5, 60.0), (0.25, 40.0), (1.02, 85.0), (0.1, 10.0)]
    assert pareto_front(points) == [5, 1, 0]
    assert pareto_front([]) == []


# --- readability: no label on another, none off the figure ---------------------------------

QUICK_LIKE = (
    ["full"]
    + [f"{m}(budget={b})" for m in ("snapkv", "keydiff") for b in (0.5, 0.25, 0.125)]
    + [f"duo_attention(retrieval={b}, sink=16, recent=64)" for b in (0.5, 0.25, 0.125)]
    + ["kivi(bits=4)", "kivi(bits=2)", "quest(budget=0.25)"]
)


def quick_like_pairs(lengths=(1024,), turns_of=(("niah_single", 1), ("niah_multiturn", 3))):
    """The quick suite's shape: 13 recipes (one family per hue, sweeps of three), needle cases
    at three depths, a one-turn and a three-turn task; scores that make several recipes tie."""
    base = synthetic_pairs()[0][0]
    pairs = []
    for length in lengths:
        for task, turns in turns_of:
            for d, depth in enumerate((0.2, 0.5, 0.8)):
                for k, recipe in enumerate(QUICK_LIKE):
                    ratio = (1.0 if recipe == "full" else 1.06 if recipe.startswith("quest")
                             else 0.28 if recipe == "kivi(bits=4)" else 0.23
                             if recipe.startswith("kivi") else
                             float(recipe.split("=")[1].split(",")[0].rstrip(")")) + 0.04)
                    rows = []
                    for t in range(turns):
                        row = dict(base)
                        row.update(
                            task=task, case_id=f"{task}-{length}-0-0-d{depth:g}",
                            target_tokens=length, depth=depth, recipe=recipe,
                            recipe_label=recipe, turn=t, kv_bytes=int(46e6 * ratio),
                            score=float(recipe == "full" or (k + d + t) % 3 == 0),
                            token_agreement=None if recipe == "full" else 0.1 * (k % 10),
                            kl=None if recipe == "full" else 0.05 * k,
                            prediction=f"<b>{1000 + k}</b> & more", gold='["1234567"]',
                            question="What is the special magic number for <key>?")
                        rows.append(row)
                    pairs.append(rows)
    return pairs


def _rows(pairs):
    return [row for rows in pairs for row in rows]


@pytest.fixture(scope="module", params=["synthetic", "quick", "quick-2-lengths"])
def ctx(request):
    from kvlab.bench.report_context import ReportContext

    pairs = {"synthetic": synthetic_pairs, "quick": quick_like_pairs,
             "quick-2-lengths": lambda: quick_like_pairs(lengths=(1024, 2048))}[request.param]()
    return ReportContext(_rows(pairs))


def test_no_label_overlaps_or_leaves_any_figure(ctx):
    from kvlab.bench.pareto import pareto_figure
    from kvlab.bench.plots import (
        _bar_figure, needle_figure, needle_rows, speed_section, text_problems, turns_figure,
    )

    figures = {"pareto": pareto_figure(ctx, ctx.rows)[0], "turns": turns_figure(ctx, ctx.rows),
               "needle": needle_figure(ctx, needle_rows(ctx.rows))}
    panels = [("kv_mib", "KV cache at answer end (MiB)", lambda s: s["kv_mib"]),
              ("decode_ms_per_token", "decode (ms per generated token)",
               lambda s: s["decode_ms_per_token"]),
              ("context_prefill_s", "context prefill (s per case)",
               lambda s: s["context_prefill_s"])]
    figures["bars"] = _bar_figure(ctx, ctx.rows, panels, ctx.recipes)
    assert speed_section(ctx).count(IMG) == 1
    for name, fig in figures.items():
        assert fig is not None, name
        assert text_problems(fig) == [], name


def test_text_problems_sees_overlaps_and_text_off_the_figure():
    from matplotlib.figure import Figure

    from kvlab.bench.plots import text_problems

    fig = Figure(figsize=(4, 3))
    ax = fig.subplots()
    ax.text(0.5, 0.5, "snapkv(budget=0.25)")
    ax.text(0.52, 0.5, "keydiff(budget=0.25)")
    ax.text(1.4, 0.1, "far to the right of the figure")
    problems = text_problems(fig)
    assert any("overlaps" in p and "snapkv" in p for p in problems)
    assert any("runs off" in p and "far to the right" in p for p in problems)


def test_pareto_names_every_recipe_in_a_legend_with_error_bars(ctx):
    from kvlab.bench.pareto import pareto_figure

    fig, missing = pareto_figure(ctx, ctx.rows)
    assert not missing
    legend = fig.legends[0]
    names = [t.get_text().replace("\n  ", " ").replace("\n", " ") for t in legend.get_texts()]
    assert names == [ctx.labels[r] for r in ctx.recipes] + ["Pareto frontier"]
    assert not any(ax.texts for ax in fig.axes)  # no annotation can sit on a marker


def test_turns_plot_shows_the_summary_numbers(ctx):
    from kvlab.bench.plots import turns_figure
    from kvlab.bench.summary import summarize

    fig = turns_figure(ctx, ctx.rows)
    plotted = {}
    for ax in fig.axes:
        for container in ax.containers:
            line = container.lines[0]
            plotted[line.get_gid()] = list(line.get_ydata())
    summaries = {s["recipe"]: s for s in summarize(ctx.rows)}
    assert set(plotted) == set(summaries)  # the same recipes as the summary table
    for recipe, ys in plotted.items():
        expected = [v * 100 for v in summaries[recipe]["accuracy_by_turn"] if v is not None]
        assert ys == pytest.approx(expected), recipe


# --- the page: run details, n and intervals, answers next to gold ---------------------------

@pytest.fixture(scope="module")
def quick_page(tmp_path_factory):
    from kvlab.bench.report import read_runs, record_run

    directory = tmp_path_factory.mktemp("quick")
    pairs = quick_like_pairs()
    write_store(directory, pairs)
    record_run(directory, "abc123", {"seed": 0, "dtype": "float32", "device": "cpu",
                                     "samples": 1, "lengths": [1024], "mode": "multi-turn",
                                     "raw_prompt": False, "wall_s": 283.4,
                                     "load_average": [3.2, 4.1, 5.0]})
    assert read_runs(directory)["abc123"]["versions"]["kvlab"]
    return build_report(directory).read_text(encoding="utf-8")


def test_page_has_run_details_versions_and_intervals(quick_page):
    import torch
    import transformers

    assert 'id="run"' in quick_page and 'id="cases"' in quick_page
    for text in ("<dt>dtype</dt><dd>float32</dd>", "<dt>seed</dt><dd>0</dd>",
                 f"torch {torch.__version__}", f"transformers {transformers.__version__}",
                 "kvlab 0.1.0", "4 min 43 s", "3.20, 4.10, 5.00", "load average at end", "chat template"):
        assert text in quick_page, text
    assert ">95% CI (%)</th>" in quick_page  # the summary's interval column
    assert 'n=3</span>' in quick_page  # n in the per-task cells


def test_page_lists_every_answer_next_to_gold_escaped(quick_page):
    assert quick_page.count('<details class="cases"') == len(QUICK_LIKE)
    assert "&lt;b&gt;1000&lt;/b&gt; &amp; more" in quick_page  # a prediction, escaped
    assert "<b>1000</b>" not in quick_page
    assert "What is the special magic number for &lt;key&gt;?" in quick_page
    assert "<td class=\"txt a\">1234567</td>" in quick_page  # the gold answer, unquoted


def test_page_without_run_json_says_so(page):
    assert "No run.json for these results" in page


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path, quick_page):
    page = tmp_path / "report.html"
    page.write_text(quick_page, encoding="utf-8")
    shot = tmp_path / "report.png"
    subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         f"--screenshot={shot}", "--window-size=1280,4000", page.as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1280, 4000)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # drawn plots and tables, not a blank page


def test_run_details_that_cannot_be_written_are_an_input_error(tmp_path):
    from kvlab.bench.report import record_run

    blocker = tmp_path / "out"
    blocker.write_text("a file where the results directory should be")
    with pytest.raises(InputError, match="cannot write the run details"):
        record_run(blocker, "abc123", {"seed": 0})

"""build_report on tiny synthetic stores: sections, embedded plots, missing pieces, escaping."""

from __future__ import annotations

import html
import re

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

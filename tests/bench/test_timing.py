"""The speed table of the results store and the report's "Time vs length" section.

Synthetic rows (no timing is measured here): they round-trip through the store, the report
shows the section (figure and table) when the store holds speed rows and not otherwise, and a
store holding only speed rows renders on its own.
"""

from __future__ import annotations

import html

import pytest
from typer.testing import CliRunner

from kvlab.bench.report import TIME_SECTION, build_report
from kvlab.bench.store import SPEED_INSERTED, ResultStore
from kvlab.bench.timing import markdown, summarise, time_figure
from kvlab.cli import app
from kvlab.errors import StoreError
from tests.bench.test_summary import synthetic_pairs, write_store

TITLE = f">{html.escape(TIME_SECTION[1])}</h2>"
VARIANTS = ("transformers", "full", "snapkv(budget=0.125)")


def speed_rows(run_id: str = "2026-12-02T10:00:00+00:00 host", lengths=(1024, 2048, 16384),
               repeats: int = 2) -> list[dict]:
    rows = []
    for length in lengths:
        position = "yarn(factor=2)" if length > 8192 else None
        for repeat in range(repeats):
            for i, variant in enumerate(VARIANTS):
                kv = length * 45_000 // (8 if variant.startswith("snapkv") else 1)
                recipe = None if variant == "transformers" else (
                    position if variant == "full" and position else
                    f"{variant} + {position}" if position else variant)
                rows.append({
                    "run_id": run_id, "model": "tiny<&>", "device": "cpu", "dtype": "bfloat16",
                    "threads": 2, "context_length": length, "variant": variant,
                    "recipe": recipe, "position": position, "repeat_index": repeat,
                    "new_tokens": 4, "prefill_s": length / 1000 * (1 + 0.1 * i) + repeat,
                    "decode_ms_per_token": 40.0 + i + length / 1000,
                    "prefill_bound_s": length / 2000, "decode_bound_ms_per_token": 20.0,
                    "kv_bytes": kv, "weight_bytes": 500_000_000, "prefill_flops": 1e12,
                    "memory_bandwidth_bytes_per_s": 2.7e10, "matmul_flops_per_s": 3.9e11,
                    "load_average": 0.5 + 0.1 * repeat,
                })
    return rows


def test_speed_rows_round_trip_through_the_store(tmp_path):
    rows = speed_rows()
    with ResultStore(tmp_path) as store:
        store.add_speed(rows)
        assert store.count() == 0  # the results table is untouched
    with ResultStore(tmp_path, read_only=True) as store:
        back = store.speed_rows()
    assert len(back) == len(rows)
    for written, read in zip(rows, back):
        assert {k: read[k] for k in SPEED_INSERTED} == written
        assert read["created_at"] is not None


def test_a_stored_speed_row_is_never_replaced(tmp_path):
    rows = speed_rows(lengths=(1024,), repeats=1)
    with ResultStore(tmp_path) as store:
        store.add_speed(rows)
        with pytest.raises(StoreError, match="never replaces a stored row"):
            store.add_speed(rows[:1] + [dict(rows[0], context_length=2048)])
        assert len(store.speed_rows()) == len(rows)  # the failed write added nothing
        store.add_speed(speed_rows(run_id="another run", lengths=(1024,), repeats=1))
        assert len(store.speed_rows()) == 2 * len(rows)


def test_summary_takes_medians_and_ratios_side_by_side():
    summary = summarise(speed_rows(lengths=(1024,), repeats=3))
    by = {r["variant"]: r for r in summary}
    assert [r["variant"] for r in summary] == list(VARIANTS)
    assert by["full"]["n"] == 3 and by["full"]["prefill_s"] == pytest.approx(1024 / 1000 * 1.1 + 1)
    assert by["full"]["prefill_vs_full"] == 1.0
    assert by["snapkv(budget=0.125)"]["decode_vs_transformers"] == pytest.approx(
        (42 + 1.024) / (40 + 1.024))
    assert by["snapkv(budget=0.125)"]["kv_bytes"] == 1024 * 45_000 // 8
    assert "| 1k | `full` |" in markdown(summary)


def test_time_figure_text_stays_on_the_figure():
    from kvlab.bench.plots import text_problems

    fig = time_figure(summarise(speed_rows()))
    assert text_problems(fig) == []
    assert [ax.get_xscale() for ax in fig.axes[:2]] == ["log", "log"]
    assert [ax.get_yscale() for ax in fig.axes[:2]] == ["log", "log"]


def test_report_has_the_time_section_only_with_speed_rows(tmp_path):
    with_speed, without = tmp_path / "with", tmp_path / "without"
    for directory in (with_speed, without):
        write_store(directory, synthetic_pairs())
    with ResultStore(with_speed) as store:
        store.add_speed(speed_rows())
    page = build_report(with_speed).read_text(encoding="utf-8")
    assert TITLE in page and 'href="#time"' in page
    assert 'alt="time vs context length"' in page
    assert "+ yarn(factor=2)" in page and "16k" in page  # the position method past the window
    assert "tiny&lt;&amp;&gt; bfloat16 on cpu" in page and "tiny<&>" not in page
    plain = build_report(without).read_text(encoding="utf-8")
    assert TITLE not in plain and 'href="#time"' not in plain


def test_a_store_of_speed_rows_only_renders_with_kvlab_report(tmp_path):
    with ResultStore(tmp_path) as store:
        store.add_speed(speed_rows(lengths=(1024, 2048), repeats=1))
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 0, result.output
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert TITLE in page and "6 speed rows" in page
    assert page.count('<img src="data:image/png;base64,') == 1


def test_speed_py_gives_transformers_the_yarn_kvlab_runs():
    """Past the window speed.py adds yarn(factor=F) to kvlab's variants and sets the same
    rope parameters on plain transformers: the two compute the same log-probabilities."""
    import importlib.util
    from pathlib import Path

    import torch

    import kvlab
    from tests.conftest import prompt_ids, tiny_model

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "speed.py"
    spec = importlib.util.spec_from_file_location("speed_script", path)
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    assert speed.position_for(8192, 8192) is None
    assert speed.position_for(16384, 8192) == "yarn(factor=2)"
    assert speed.position_for(32768, 8192) == "yarn(factor=4)"
    assert speed.with_position("full", "yarn(factor=2)") == "yarn(factor=2)"
    assert speed.with_position("snapkv(budget=0.5)", "yarn(factor=2)") == "snapkv(budget=0.5) + yarn(factor=2)"
    assert speed.with_position("dynamic_ntk(factor=8)", "yarn(factor=2)") == "dynamic_ntk(factor=8)"

    ids = prompt_ids(100)
    plain = tiny_model(max_position_embeddings=64, attn_implementation="sdpa")
    original = dict(plain.config.rope_parameters)
    speed.plain_rope(plain, "yarn(factor=2)", original)
    assert plain.config.rope_parameters["rope_type"] == "yarn"
    with torch.inference_mode():
        theirs = torch.log_softmax(plain(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    engine = kvlab.Engine(tiny_model(max_position_embeddings=64), None, progress=False)
    sequence = engine.new_sequence("yarn(factor=2)")
    logits = engine.prefill(sequence, ids, compress=True)
    assert torch.allclose(torch.log_softmax(logits, -1), theirs[-1], atol=1e-4)
    speed.plain_rope(plain, None, original)  # back to the model's own rope
    assert plain.config.rope_parameters == original

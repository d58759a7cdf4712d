"""summarize / summary_table on a tiny synthetic results table, numbers checked by hand."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from kvlab.bench.store import COLUMN_NAMES, ResultStore
from kvlab.bench.summary import (
    SUMMARY_COLUMNS, recipe_order, summarize, summary_markdown, summary_table,
)

MIB = 2**20
# canonical recipe, label, kv bytes relative to full, token agreement, KL (nats)
RECIPES = [
    ("snapkv(budget=0.25, window=32)", "snapkv(budget=0.25)", 0.25, 0.5, 0.2),
    ("full", "full", 1.0, None, None),
    ("quest(budget=0.5, page=16)", "quest(budget=0.5)", 0.5, 0.9, 0.05),
]
LENGTHS = (1000, 2000)
DEPTHS = (0.0, 1.0)


def _score(recipe: str, task: str, length: int, depth: float | None, turn: int) -> float:
    """full: always right. snapkv: loses the needle at depth 1 and every second turn.
    quest: loses only the second turn of the 2000-token kv_retrieval case."""
    if recipe.startswith("snapkv"):
        return 0.0 if depth == 1.0 or turn == 1 else 1.0
    if recipe.startswith("quest"):
        return 0.0 if (task, length, turn) == ("kv_retrieval", 2000, 1) else 1.0
    return 1.0


def synthetic_pairs(model: str = "SmolLM2-135M-Instruct") -> list[list[dict[str, Any]]]:
    """Rows of each (case, recipe) pair: a needle task (2 lengths x 2 depths, 1 turn) and an
    scbench task (2 lengths, 2 turns), for 3 recipes; every stored column filled."""
    cases = [("niah_single", "ruler", n, d, 1) for n in LENGTHS for d in DEPTHS]
    cases += [("kv_retrieval", "scbench", n, None, 2) for n in LENGTHS]
    pairs = []
    for task, family, length, depth, turns in cases:
        case_id = f"{task}-{length}-7-0" + ("" if depth is None else f"-d{depth:g}")
        for recipe, label, ratio, agree, kl in RECIPES:
            full = recipe == "full"
            rows = []
            for turn in range(turns):
                kv = int(length * 1024 * ratio)
                rows.append({
                    "settings_id": "abc123", "model": model, "mode": "multi-turn", "prompt": "chat", "reference": "full",
                    "task": task, "family": family, "case_id": case_id,
                    "target_tokens": length, "depth": depth, "recipe": recipe,
                    "recipe_label": label, "turn": turn, "question": "What is the key?",
                    "gold": '["42"]', "prediction": "42", "metric": "string_match_all",
                    "score": _score(recipe, task, length, depth, turn),
                    "token_agreement": agree, "kl": kl,
                    "context_tokens": length, "prompt_tokens": length + 20 * (turn + 1),
                    "new_tokens": 10, "kv_tokens": length * ratio, "kv_bytes": kv,
                    "context_kv_bytes": kv,
                    "context_prefill_s": length / 1000 + (0.0 if full else 0.1),
                    "prefill_s": 0.05, "decode_s": 0.2 if full else 0.1,
                    "decode_s_per_token": 0.02 if full else 0.01,
                    "peak_rss_bytes": (500 if length == 1000 else 600) * MIB, "device": "cpu",
                })
            pairs.append(rows)
    return pairs


def write_store(directory: Path, pairs: list[list[dict[str, Any]]]) -> None:
    with ResultStore(directory) as store:
        for rows in pairs:
            assert set(rows[0]) == set(COLUMN_NAMES) - {"created_at"}
            store.add(rows)


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict[str, Any]]:
    directory = tmp_path_factory.mktemp("store")
    write_store(directory, synthetic_pairs())
    with ResultStore(directory) as store:
        return store.rows()


def test_one_line_per_recipe_full_first(rows):
    assert len(rows) == 3 * 8
    summaries = summarize(rows)
    assert [s["recipe"] for s in summaries] == [
        "full", "snapkv(budget=0.25, window=32)", "quest(budget=0.5, page=16)"
    ]  # full first, then in the order they were run (written)
    assert [s["label"] for s in summaries] == ["full", "snapkv(budget=0.25)", "quest(budget=0.5)"]
    assert all(s["n_cases"] == 6 and s["n_rows"] == 8 for s in summaries)
    assert {(s["model"], s["mode"]) for s in summaries} == {("SmolLM2-135M-Instruct", "multi-turn")}


def test_recipe_order_keeps_first_appearance_with_full_first():
    rows = [{"recipe": "b"}, {"recipe": "a"}, {"recipe": "full"}, {"recipe": "b"}]
    assert recipe_order(rows) == ["full", "b", "a"]


def test_accuracy_and_accuracy_by_turn(rows):
    full, snap, quest = summarize(rows)
    assert full["accuracy"] == 1.0 and full["accuracy_by_turn"] == [1.0, 1.0]
    # snapkv: needle rows 1, 0, 1, 0; kv_retrieval turn 0 right, turn 1 wrong (2 cases);
    # per turn only the cases with several turns count (kv_retrieval), as in the per-turn plot
    assert snap["accuracy"] == pytest.approx(4 / 8)
    assert snap["accuracy_by_turn"] == pytest.approx([1.0, 0.0])
    assert snap["accuracy_by_turn_n"] == [2, 2] and snap["n_scored"] == 8
    # 95 % Wilson interval of 4 right out of 8
    low, high = snap["accuracy_ci"]
    assert (low, high) == pytest.approx((0.2152, 0.7848), abs=1e-4)
    # quest: only the 2000-token kv_retrieval case's second turn is wrong
    assert quest["accuracy"] == pytest.approx(7 / 8)
    assert quest["accuracy_by_turn"] == pytest.approx([1.0, 0.5])


def test_memory_ratio_and_fidelity(rows):
    full, snap, quest = summarize(rows)
    assert full["kv_ratio"] == pytest.approx(1.0)
    assert snap["kv_ratio"] == pytest.approx(0.25, abs=1e-6)
    assert quest["kv_ratio"] == pytest.approx(0.5, abs=1e-6)
    # kv_bytes = length * 1024 * ratio over 4 rows at 1000 and 4 rows at 2000 tokens
    assert full["kv_mib"] == pytest.approx(1500 * 1024 / MIB)
    assert snap["kv_mib"] == pytest.approx(1500 * 256 / MIB, rel=1e-5)
    assert full["token_agreement"] is None and full["kl"] is None
    assert snap["token_agreement"] == pytest.approx(0.5) and snap["kl"] == pytest.approx(0.2)
    assert quest["token_agreement"] == pytest.approx(0.9) and quest["kl"] == pytest.approx(0.05)


def test_timings_and_rss(rows):
    full, snap, _ = summarize(rows)
    # context prefill is one value per case (6 cases: 1, 1, 2, 2, 1, 2 s), not per turn row
    assert full["context_prefill_s"] == pytest.approx(1.5)
    assert snap["context_prefill_s"] == pytest.approx(1.6)
    assert full["decode_ms_per_token"] == pytest.approx(20.0)
    assert snap["decode_ms_per_token"] == pytest.approx(10.0)
    assert full["peak_rss_mib"] == pytest.approx(600.0)


def test_no_full_rows_means_no_ratio(rows):
    summaries = summarize([r for r in rows if r["recipe"] != "full"])
    assert [s["kv_ratio"] for s in summaries] == [None, None]
    assert summaries[0]["kv_mib"] is not None


def test_extra_grouping_by_length(rows):
    summaries = summarize(rows, by=("target_tokens",))
    assert [(s["recipe"][:5], s["target_tokens"]) for s in summaries] == [
        ("full", 1000), ("full", 2000), ("snapk", 1000), ("snapk", 2000),
        ("quest", 1000), ("quest", 2000),
    ]
    quest_2000 = summaries[5]
    assert quest_2000["accuracy"] == pytest.approx(3 / 4)
    assert quest_2000["kv_mib"] == pytest.approx(2000 * 512 / MIB, rel=1e-5)
    assert summarize([]) == []


def test_summary_table_headers_carry_units(rows):
    headers = {c.key: c.header for c in SUMMARY_COLUMNS}
    assert headers["accuracy"] == "acc (%)" and headers["kv_mib"] == "KV (MiB)"
    assert headers["kl"] == "KL (nats)" and headers["decode_ms_per_token"] == "decode (ms/tok)"
    console = Console(record=True, width=200)
    console.print(summary_table(rows))
    text = console.export_text()
    for unit in ("(%)", "(MiB)", "(x)", "(nats)", "(s)", "(ms/tok)", "(n)"):
        assert unit in text
    for name in ("acc", "KV", "KL", "prefill", "decode", "peak RSS", "acc per", "turn"):
        assert name in text
    line = next(line for line in text.splitlines() if line.strip().startswith("snapkv"))
    # snapkv: 6 cases, 8 rows, 50 % right (95 % CI 22-78 %), 100 % then 0 % per turn, 0.25 x
    # full's KV, token agreement 50 %, KL 0.2 nats, prefill 1.6 s, decode 10 ms/token, 600 MiB
    assert line.split() == ["snapkv(budget=0.25)", "6", "8", "50.0", "22-78", "100", "/", "0",
                            f"{1500 * 256 / MIB:.3f}", "0.25", "50.0", "0.200", "1.60",
                            "10.0", "600"]


def test_summary_markdown_has_the_terminal_numbers(rows):
    text = summary_markdown(rows)
    lines = text.splitlines()
    assert lines[0].startswith("| recipe | cases (n) |") and "KL (nats)" in lines[0]
    assert lines[1].startswith("|---|---:|")
    snapkv = next(line for line in lines if line.startswith("| snapkv"))
    cells = [c.strip() for c in snapkv.strip("|").split("|")]
    assert cells[:7] == ["snapkv(budget=0.25)", "6", "8", "50.0", "22-78", "100 / 0",
                         f"{1500 * 256 / MIB:.3f}"]
    assert len(lines) == 2 + len(summarize(rows))


def test_wilson_interval():
    from kvlab.bench.summary import wilson_interval

    assert wilson_interval(1.0, 3) == pytest.approx((0.4385, 1.0), abs=1e-4)
    assert wilson_interval(0.0, 3) == pytest.approx((0.0, 0.5615), abs=1e-4)
    assert wilson_interval(0.5, 0) == (0.0, 1.0)


def test_summary_at_80_columns_keeps_recipes_and_headers_whole(rows):
    long = "duo_attention(retrieval=0.125, sink=16, recent=64)"
    relabelled = [dict(r, recipe_label=long) if r["recipe"].startswith("snapkv") else r
                  for r in rows]
    console = Console(record=True, width=80)
    console.print(summary_table(relabelled, width=80))
    text = console.export_text()
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines)
    tables = [i for i, line in enumerate(lines) if "results: " in line]
    assert len(tables) == 2  # split in two parts, each with the recipe column
    assert sum(line.split()[:1] == ["recipe"] for line in lines) == 2
    for part in ("part 1 of 2", "part 2 of 2"):
        assert part in text
    # every recipe named in both parts: full, the long label wrapped at spaces, quest
    assert sum(line.startswith(" full ") for line in lines) == 2
    assert sum("quest(budget=0.5)" in line for line in lines) == 2
    assert text.count("duo_attention(retrieval=") == 2 and text.count("recent=64)") == 2
    # every header word whole (stacked, never cut) and every number present
    for word in ("cases", "rows", "acc", "95% CI", "KV", "token", "agree", "KL", "prefill",
                 "decode", "peak RSS", "(ms/tok)", "(nats)", "(MiB)"):
        assert word in text, word
    for number in ("22-78", "0.25", "0.200", "1.60", "10.0", "600"):
        assert number in text, number
    # the same table at 200 columns is one part
    wide = Console(record=True, width=200)
    wide.print(summary_table(relabelled, width=200))
    assert "part 1" not in wide.export_text()

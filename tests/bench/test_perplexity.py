"""Perplexity by position (kvlab ppl): NLL against a written-out reference, chunking, bins, store."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

import kvlab
from kvlab.bench.perplexity import (
    bins_of, check_lengths, document, document_nll, perplexity_rows, run_perplexity,
)
from kvlab.bench.store import ResultStore
from kvlab.errors import InputError, RecipeError
from tests.conftest import prompt_ids, tiny_engine, tiny_model


def reference_nll(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Plain transformers over the whole sequence (no kvlab), NLL written out by hand:
    ``-log softmax(logits[p - 1])[x_p]`` for p = 1 .. n-1."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logprobs = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
    return torch.stack([-logprobs[p - 1, ids[p]] for p in range(1, len(ids))])


def test_full_equals_plain_transformers_per_bin():
    ids = prompt_ids(192)
    reference = reference_nll(tiny_model(), ids)  # a fresh copy: the engine patches its model
    engine = tiny_engine()
    nll = document_nll(engine, "full", ids, chunk=48, tail=64)
    torch.testing.assert_close(nll.double(), reference, atol=1e-4, rtol=1e-4)
    bins = bins_of(nll, 64)
    ref_bins = [float(reference[max(0, s - 1) : e - 1].sum()) for s, e in ((0, 64), (64, 128), (128, 192))]
    assert [b.tokens for b in bins] == [63, 64, 64]
    for b, ref in zip(bins, ref_bins):
        assert b.nll_sum == pytest.approx(ref, rel=1e-5)
        assert b.perplexity == pytest.approx(math.exp(ref / b.tokens), rel=1e-5)


@pytest.mark.parametrize("recipe", ["full", "self_extend(group_size=2, window=32)", "yarn(factor=2)"])
def test_chunking_does_not_change_the_nll(recipe):
    engine = tiny_engine()
    ids = prompt_ids(160, seed=3)
    one = document_nll(engine, recipe, ids, chunk=160, tail=0)
    many = document_nll(engine, recipe, ids, chunk=17, tail=40)
    torch.testing.assert_close(many, one, atol=2e-5, rtol=1e-4)


def test_position_method_changes_the_nll_past_the_window():
    """Not a copy of full: past the tiny model's window, yarn scores differently."""
    engine = tiny_engine(max_position_embeddings=64)
    ids = prompt_ids(160, seed=4)
    full = document_nll(engine, "full", ids, chunk=32)
    yarn = document_nll(engine, "yarn(factor=4)", ids, chunk=32)
    assert (full - yarn).abs().max() > 1e-3


def test_compression_acts_on_the_last_bin_only():
    """The context is scored uncompressed; the appended last bin reads the compressed cache."""
    engine = tiny_engine()
    ids = prompt_ids(192, seed=5)
    full = document_nll(engine, "full", ids, chunk=64, tail=64)
    snap = document_nll(engine, "snapkv(budget=0.25, window=8)", ids, chunk=64, tail=64)
    torch.testing.assert_close(snap[:127], full[:127], atol=1e-5, rtol=1e-5)
    assert (snap[127:] - full[127:]).abs().max() > 1e-3


def test_bins_partition_the_tokens():
    nll = torch.rand(4095)
    bins = bins_of(nll, 1024)
    assert [(b.start, b.end) for b in bins] == [(0, 1024), (1024, 2048), (2048, 3072), (3072, 4096)]
    assert sum(b.tokens for b in bins) == nll.numel()
    assert sum(b.nll_sum for b in bins) == pytest.approx(float(nll.double().sum()))


@pytest.mark.parametrize(
    ("lengths", "bin_size", "named"),
    [([1000], 256, "1000"), ([4096], 0, "bin size 0"), ([128], 128, "length 128"),
     ([], 1024, "at least one"), ([2 * 1024 * 1024], 1024, "at most")],
)
def test_bad_lengths_and_bins_are_refused(lengths, bin_size, named):
    with pytest.raises(InputError, match=named):
        check_lengths(lengths, bin_size)


def test_bad_recipes_are_refused():
    engine = tiny_engine()
    with pytest.raises(RecipeError, match="gemfilter"):
        document_nll(engine, "gemfilter", prompt_ids(64))
    with pytest.raises(RecipeError, match="nosuch"):
        document_nll(engine, "nosuch(x=1)", prompt_ids(64))
    with pytest.raises(InputError, match="chunk 0"):
        document_nll(engine, "full", prompt_ids(64), chunk=0)


def test_document_is_shipped_prose(tokenizer):
    ids = document(tokenizer, 512, start=100)
    assert "Bennet" in tokenizer.decode(document(tokenizer, 4096))
    assert len(ids) == 512
    with pytest.raises(InputError, match="shipped prose"):
        document(tokenizer, 1024 * 1024)


def test_rows_are_stored_and_resumed(tmp_path, tokenizer):
    model = tiny_model(vocab_size=len(tokenizer), max_position_embeddings=256)
    engine = kvlab.Engine(model, tokenizer, progress=False)
    lines: list[str] = []
    with ResultStore(tmp_path) as store:
        assert run_perplexity(engine, ["full", "yarn(factor=2)"], [256], store, bin_size=64,
                              chunk=64, say=lines.append) == 2
        assert run_perplexity(engine, ["full"], [256], store, bin_size=64, chunk=64,
                              say=lines.append) == 0
        rows = store.perplexity_rows()
    assert len(rows) == 8 and {r["recipe_label"] for r in rows} == {"full", "yarn(factor=2)"}
    assert "already stored" in lines[-1] and "last bin ppl" in lines[0]
    one = perplexity_rows(engine, "full", 256, bin_size=64, chunk=32)
    stored = [r for r in rows if r["recipe"] == "full"]
    assert [r["nll_sum"] for r in one] == pytest.approx([r["nll_sum"] for r in stored], rel=1e-5)


def test_report_has_a_perplexity_section(tmp_path, tokenizer):
    from kvlab.bench.ppl_report import summary
    from kvlab.bench.report import build_report

    model = tiny_model(vocab_size=len(tokenizer), max_position_embeddings=128)
    engine = kvlab.Engine(model, tokenizer, progress=False)
    with ResultStore(tmp_path) as store:
        run_perplexity(engine, ["full", "yarn(factor=2)"], [256], store, bin_size=64, chunk=64,
                       say=lambda line: None)
        rows = store.perplexity_rows()
    page = build_report(tmp_path).read_text()
    assert '<section id="perplexity">' in page and "Perplexity by position" in page
    assert page.count("data:image/png;base64") == 1 and "last / in-window" in page
    full = [r for r in rows if r["recipe"] == "full"]
    s = summary(full, 128)
    assert s["inside_bin"] == (64, 128) and s["last_bin"] == (192, 256)
    assert s["ratio"] == pytest.approx(full[-1]["perplexity"] / full[1]["perplexity"])
    assert f"{s['ratio']:.2f}x" in page and f"{s['window_ratio']:.2f}x" in page
    inside = full[:2]
    assert s["window_ppl"] == pytest.approx(
        math.exp(sum(r["nll_sum"] for r in inside) / sum(r["tokens"] for r in inside)))
    # benchmarks/ppl_curves.py's Markdown tables say the same numbers as the page
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "ppl_curves.py"
    spec = importlib.util.spec_from_file_location("kvlab_ppl_curves", path)
    curves = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(curves)
    tables = curves.markdown_tables(
        {"full": full, "yarn": [r for r in rows if r["recipe"] != "full"]}, 128)
    line = next(t for t in tables.splitlines() if t.startswith("| `full` | 128 |"))
    assert f"| {s['ratio']:.2f}x | {s['window_ratio']:.2f}x |" in line
    assert "| recipe | 0-64 | 64-128 | 128-192 | 192-256 |" in tables


def test_a_longer_document_with_an_extension_only_is_read_against_the_models_window(tmp_path, tokenizer):
    """A 512-token document run with only a 4x extension: its section names the model's own
    window (128, from ``full`` on the 256-token document), not the extension's."""
    from kvlab.bench.ppl_report import ppl_section

    model = tiny_model(vocab_size=len(tokenizer), max_position_embeddings=128)
    engine = kvlab.Engine(model, tokenizer, progress=False)
    with ResultStore(tmp_path) as store:
        run_perplexity(engine, ["full"], [256], store, bin_size=64, chunk=64, say=lambda line: None)
        run_perplexity(engine, ["yarn(factor=4)"], [512], store, bin_size=64, chunk=64,
                       say=lambda line: None)
        rows = store.perplexity_rows()
    section = ppl_section(rows)
    assert section.count("window 128 tokens") == 2 and "window 512 tokens" not in section

"""dtype: a bfloat16 model runs through kvlab on the CPU, its cache holds keys and values in
the model's dtype (so ``full`` holds half the bytes of float32), and what ``dtype=`` accepts.

The refusals (an unknown dtype, float16 on the CPU) are rows of tests/test_bad_input.py.
"""

from __future__ import annotations

import pytest
import torch

import kvlab
from kvlab.engine.loading import resolve_dtype
from tests.conftest import prompt_ids, tiny_model

IDS = prompt_ids(120)
FOLLOW = prompt_ids(6, seed=2)


def engine(dtype: torch.dtype, **kwargs) -> kvlab.Engine:
    return kvlab.Engine(tiny_model().to(dtype), None, progress=False, **kwargs)


def run(e: kvlab.Engine, recipe: str | None):
    sequence = e.new_sequence(recipe)
    logits = e.prefill(sequence, IDS, compress=True)
    return sequence, e.teacher_force(sequence, logits, FOLLOW)


@pytest.mark.parametrize("recipe", [None, "snapkv(budget=0.5)", "quest(budget=0.5)"])
def test_bfloat16_runs_prefill_and_decode_close_to_float32(recipe):
    seq16, lp16 = run(engine(torch.bfloat16), recipe)
    _, lp32 = run(engine(torch.float32), recipe)
    layer = seq16.cache.layers[0]
    assert layer.keys.dtype == layer.values.dtype == torch.bfloat16
    assert lp16.dtype == torch.float32 and torch.isfinite(lp16).all()
    # the same random model: bfloat16's 8-bit mantissa moves log-probs, not the picture
    assert (lp16 - lp32).abs().max() < 0.25


def test_full_holds_half_the_bytes_in_bfloat16():
    seq16, _ = run(engine(torch.bfloat16), None)
    seq32, _ = run(engine(torch.float32), None)
    assert seq16.nbytes() * 2 == seq32.nbytes()
    layer = seq16.cache.layers[0]
    stored = sum(t.numel() * t.element_size() for t in (layer.keys, layer.values))
    assert stored == layer.keys.numel() * 2 * 2  # keys and values, 2 bytes a value


def test_side_indexes_are_counted_in_their_own_dtype():
    """Quest's page bounds (built at the first decoding step) are min/max of the stored keys:
    they follow the model's dtype and count in nbytes as they are stored."""
    recipe = "quest(budget=32, page=16, dense_layers=0)"
    (seq16, _), (seq32, _) = run(engine(torch.bfloat16), recipe), run(engine(torch.float32), recipe)
    index = seq16.cache.layers[0].side["quest.page_bounds"]
    assert index.mins.dtype == torch.bfloat16
    full16, _ = run(engine(torch.bfloat16), None)
    assert seq16.nbytes() == full16.nbytes() + sum(
        layer.side["quest.page_bounds"].nbytes() for layer in seq16.cache.layers) > full16.nbytes()
    assert seq16.nbytes() * 2 == seq32.nbytes()


def test_chunked_prefill_equals_one_chunk_in_each_dtype():
    """The prefill chunk's float mask (kernels.chunk_mask) is in the model's dtype."""
    for dtype in (torch.float32, torch.bfloat16):
        one, chunked = engine(dtype), engine(dtype, prefill_chunk=32)
        _, a = run(one, None)
        _, b = run(chunked, None)
        assert (a - b).abs().max() < (1e-4 if dtype == torch.float32 else 0.1)


def test_dtype_names():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cuda) == torch.float16
    assert resolve_dtype(torch.bfloat16, cpu) == torch.bfloat16
    with pytest.raises(kvlab.InputError, match="float16 runs on CUDA only"):
        resolve_dtype(torch.float16, cpu)

"""Written-out references for the sparse prefill tests: tiles to token masks, masked dense
attention, and the engine-level checks every prefill method shares."""

import torch

from kvlab.engine.kernels import dense_attention
from tests.conftest import prompt_ids, tiny_engine
from tests.prefill.test_ashape import context_for  # noqa: F401  (re-exported for the tests)


def rotated_inputs(ctx, q):
    n = q.shape[2]
    return ctx.rotary.rotate(q, torch.arange(n)), ctx.layer.keys, ctx.layer.values


def tiles_to_tokens(tiles, n, block):
    """Boolean ``[heads, nqb, nkb]`` tiles (one batch) -> ``[1, heads, n, n]`` token mask, causal."""
    heads = tiles.shape[0]
    mask = torch.zeros(1, heads, n, n, dtype=torch.bool)
    for h in range(heads):
        for i in range(n):
            for kb in range(tiles.shape[2]):
                if tiles[h, i // block, kb]:
                    mask[0, h, i, kb * block : min(n, (kb + 1) * block)] = True
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    return mask & (j <= i)


def masked_dense(ctx, q, allowed):
    qr, k, v = rotated_inputs(ctx, q)
    return dense_attention(qr, k, v, ctx.scaling, allowed)


def assert_engine_dense_when_covering(wide, narrow):
    """``wide`` reproduces ``full`` token for token on a 120-token prompt; ``narrow`` changes
    the prefill logits."""
    engine = tiny_engine()
    ids = prompt_ids(120)
    full = engine.generate_ids(ids, "full", max_new_tokens=8)
    assert engine.generate_ids(ids, wide, max_new_tokens=8).token_ids == full.token_ids
    dense = engine.prefill(engine.new_sequence("full"), ids, compress=False)
    got = engine.prefill(engine.new_sequence(wide), ids, compress=False)
    torch.testing.assert_close(got, dense, atol=1e-4, rtol=1e-4)
    sparse = engine.prefill(engine.new_sequence(narrow), ids, compress=False)
    assert not torch.allclose(sparse, dense, atol=1e-3)

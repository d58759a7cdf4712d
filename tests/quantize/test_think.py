"""ThinK: per KV head, the key channels with the least query-key interaction are dropped."""

import math

import pytest
import torch

import kvlab
from kvlab.quantize.think import ThinK, ThinKLayerKV
from tests.conftest import prefilled, prompt_ids, teacher_logprobs, tiny_engine
from tests.layers import probs_of, random_layer


LISTED = "think(ratio=0.5)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


N, D, KV_HEADS, QUERY_HEADS = 60, 8, 2, 4  # random_layer's defaults; the base of its RoPE is 100


def think_layer(ratio=0.4, window=32, n=N, seed=0):
    """A random prefilled layer held by a ThinKLayerKV, pruned by ``ThinK(ratio, window)``.
    Returns the method, the context, the unrotated queries and the keys / values before."""
    ctx, q = random_layer(n=n, seed=seed)
    keys, values = ctx.layer.keys, ctx.layer.values
    ctx.layer = ThinKLayerKV()
    ctx.layer.append(keys, values, torch.arange(n))
    method = ThinK(ratio=ratio, window=window)
    method.convert(q, ctx)
    return method, ctx, q, keys, values


def rope_by_hand(x, position):
    """RoPE of one vector ``[d]`` at ``position``: channel i paired with i + d/2, base 100."""
    d = x.shape[0]
    out = x.clone()
    for i in range(d // 2):
        angle = position * 100 ** (-2 * i / d)
        c, s = math.cos(angle), math.sin(angle)
        out[i] = x[i] * c - x[i + d // 2] * s
        out[i + d // 2] = x[i + d // 2] * c + x[i] * s
    return out


def reference_channels(q, keys, ratio, window):
    """Brute force, per KV head: score_c = (sum over the head's query heads of the mean of
    q_c^2 over the last ``window`` rotated queries) x (mean of k_c^2 over the keys); keep the
    d - floor(ratio * d) best channels, sorted."""
    n, d = keys.shape[2], keys.shape[3]
    group = QUERY_HEADS // KV_HEADS
    kept = d - math.floor(ratio * d)
    chosen = []
    for head in range(KV_HEADS):
        scores = []
        for c in range(d):
            q_power = 0.0
            for query_head in range(head * group, (head + 1) * group):
                rows = [rope_by_hand(q[0, query_head, p], p)[c] ** 2 for p in range(n - window, n)]
                q_power += sum(rows) / window
            k_power = sum(keys[0, head, p, c] ** 2 for p in range(n)) / n
            scores.append(float(q_power * k_power))
        best = sorted(range(d), key=lambda c: -scores[c])[:kept]
        chosen.append(sorted(best))
    return torch.tensor([chosen])


@pytest.mark.parametrize("ratio, window", [(0.4, 32), (0.5, 8), (0.75, 60)])
def test_channels_are_the_top_query_key_interactions_per_kv_head(ratio, window):
    _, ctx, q, keys, _ = think_layer(ratio=ratio, window=window)
    expected = reference_channels(q, keys, ratio, window)
    layer = ctx.layer
    assert torch.equal(layer.channels.long(), expected)
    kept = expected[:, :, None].expand(-1, -1, N, -1)
    assert torch.equal(layer.keys.gather(3, kept), keys.gather(3, kept))  # kept channels exact
    assert int(layer.keys.ne(0).sum()) == kept.numel()  # the dropped ones read back as zeros
    assert not torch.equal(expected[0, 0], expected[0, 1])  # each KV head has its own channels


def test_storage_is_really_narrower_and_nbytes_is_exact():
    _, ctx, _, _, _ = think_layer(ratio=0.4)
    layer = ctx.layer
    kept = D - 3  # floor(0.4 * 8) = 3 channels dropped
    assert layer.channels.shape == (1, KV_HEADS, kept) and layer.channels.dtype == torch.uint8
    pruned, index, values = KV_HEADS * N * kept * 4, KV_HEADS * kept, KV_HEADS * N * D * 4
    assert layer.nbytes() == pruned + index + values  # fp32, no positions (nothing evicted)
    assert layer.keys.shape == (1, KV_HEADS, N, D) and layer.num_entries == N
    # decoding appends full-width entries in place: a reserve of min(32, n // 16) = 3 entries
    for position in range(N, N + 4):
        token = torch.randn(1, KV_HEADS, 1, D)
        layer.append(token, token, torch.tensor([position]))
        assert torch.equal(layer.keys[:, :, -1:], token)
    full_width = KV_HEADS * 4 * D * 4  # 1 + 3 reserved entries, then 4 used: no regrowth
    assert layer.nbytes() == pruned + index + full_width + KV_HEADS * (N + 4) * D * 4


def reference_attention(q, keys, values, q_positions, rot):
    """Attention ``[Hq, len(q_positions), d]`` by hand: one causal softmax per query row."""
    group = QUERY_HEADS // KV_HEADS
    out = torch.zeros(QUERY_HEADS, len(q_positions), D)
    for query_head in range(QUERY_HEADS):
        head = query_head // group
        for row, position in enumerate(q_positions):
            p = probs_of(q[0, query_head, row], position, keys[0, head], rot)
            out[query_head, row] = p @ values[0, head]
    return out


def zeroed(keys, channels):
    """``keys`` with every channel not in ``channels`` ``[1, h, d_kept]`` set to zero."""
    mask = torch.zeros(keys.shape[1], keys.shape[-1], dtype=torch.bool)
    for head in range(keys.shape[1]):
        mask[head, channels[0, head].long()] = True
    return keys * mask[None, :, None, :]


def attend(ctx, q, q_positions):
    layer = ctx.layer
    out = ctx.attend(q, q_positions, layer.keys, layer.key_positions(), layer.values)
    return out[0]


def test_attention_equals_attention_over_keys_with_dropped_channels_zeroed():
    _, ctx, q, keys, values = think_layer(ratio=0.5)
    rows = torch.arange(N - 6, N)
    got = attend(ctx, q[:, :, -6:], rows)
    expected = reference_attention(q[:, :, -6:], zeroed(keys, ctx.layer.channels), values,
                                   rows.tolist(), ctx.rotary)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    full = reference_attention(q[:, :, -6:], keys, values, rows.tolist(), ctx.rotary)
    assert (got - full).abs().max() > 1e-2  # pruning changed the attention
    # a decoded token's key stays full width
    token, query = torch.randn(1, KV_HEADS, 1, D), torch.randn(1, QUERY_HEADS, 1, D)
    rotated = ctx.rotary.rotate(token, torch.tensor([N]))
    ctx.layer.append(rotated, token, torch.tensor([N]))
    got = attend(ctx, query, torch.tensor([N]))
    expected = reference_attention(
        query, torch.cat([zeroed(keys, ctx.layer.channels), rotated], 2),
        torch.cat([values, token], 2), [N], ctx.rotary,
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_ratio_zero_is_the_full_cache():
    _, ctx, q, keys, values = think_layer(ratio=0.0)
    rows = torch.arange(N - 6, N)
    full = reference_attention(q[:, :, -6:], keys, values, rows.tolist(), ctx.rotary)
    torch.testing.assert_close(attend(ctx, q[:, :, -6:], rows), full, rtol=1e-5, atol=1e-6)
    assert not ctx.layer.pruned and ctx.layer.nbytes() == 2 * KV_HEADS * N * D * 4


def test_selection_keeps_stored_keys_and_moves_extra_pruned_entries_to_full_width():
    _, ctx, _, _, _ = think_layer(ratio=0.5)
    layer = ctx.layer
    for position in range(N, N + 4):
        token = torch.randn(1, KV_HEADS, 1, D)
        layer.append(token, token, torch.tensor([position]))
    keys, values = layer.keys, layer.values
    # head 0: 20 pruned entries + the 4 full-width ones; head 1: 22 pruned + 2 full-width
    keep = torch.tensor([[list(range(0, 40, 2)) + [60, 61, 62, 63],
                          list(range(1, 45, 2)) + [62, 63]]])
    layer.select(keep)
    index = keep[..., None].expand(-1, -1, -1, D)
    assert torch.equal(layer.keys, keys.gather(2, index))
    assert torch.equal(layer.values, values.gather(2, index))
    assert torch.equal(layer.positions, keep.to(torch.int32))
    # every head keeps 20 pruned; head 1's two extra pruned entries read back at full width
    assert layer.pruned_entries == 20 and layer.num_entries == 24
    assert layer.nbytes() == (
        KV_HEADS * (20 * 4 * 4 + 4 * D * 4 + 24 * D * 4 + 24 * 4) + KV_HEADS * 4
    )  # pruned keys, full-width keys, values, int32 positions; uint8 channels
    layer.select(torch.arange(10, 24))  # one set for every head
    assert torch.equal(layer.keys, keys.gather(2, index)[:, :, 10:24])
    assert layer.pruned_entries == 10 and layer.num_entries == 14


def test_truncate_and_snapshots_return_to_the_pruned_context_exactly():
    _, ctx, _, _, _ = think_layer(ratio=0.5)
    layer = ctx.layer
    g = torch.Generator().manual_seed(3)

    def state():
        return layer.keys, layer.values, layer.nbytes(), layer.seen

    def same_as(expected):
        keys, values, nbytes, seen = expected
        return (torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
                and layer.nbytes() == nbytes and layer.seen == seen)

    def decode(start, count):
        for position in range(start, start + count):
            token = torch.randn(1, KV_HEADS, 1, D, generator=g)
            layer.append(token, token, torch.tensor([position]))

    context = state()
    for _ in range(2):  # the second round starts from the rolled-back layer
        question = torch.randn(1, KV_HEADS, 5, D, generator=g)
        layer.append(question, question, torch.arange(N, N + 5))
        marked = state()
        decode(N + 5, 7)
        layer.truncate(N + 5, N + 5)
        assert same_as(marked)
        layer.truncate(N, N)
        assert same_as(context)
    # marks with snapshots (tensors by reference) taken while decoding writes the reserve in
    # place, then evictions: restoring loads the snapshot, which later appends never touched
    context_mark = layer.mark(snapshot=True)
    decode(N, 1)
    mark, marked = layer.mark(snapshot=True), state()
    for _ in range(2):
        decode(N + 1, 2)  # in place, beyond the marked entries
        layer.select(torch.tensor([[list(range(1, 63))], [list(range(0, 62))]]).view(1, 2, 62))
        layer.restore(mark)
        assert same_as(marked) and layer.evictions == 0
    layer.restore(context_mark)
    assert same_as(context) and layer.num_entries == N


def test_before_pruning_it_is_a_plain_layer():
    ctx, _ = random_layer()
    layer = ThinKLayerKV()
    layer.append(ctx.layer.keys, ctx.layer.values, torch.arange(N))
    layer.select(torch.arange(0, N, 2))
    assert torch.equal(layer.keys, ctx.layer.keys[:, :, ::2]) and not layer.pruned
    assert layer.nbytes() == 2 * KV_HEADS * (N // 2) * D * 4 + (N // 2) * 4


def test_methods_list_think_under_quantize_with_its_paper():
    info = next(m for m in kvlab.methods() if m.name == "think")
    assert info.stage == "quantize" and "2407.21018" in info.paper
    assert {p.name: p.default for p in info.params} == {"ratio": 0.4, "window": 32}
    assert kvlab.parse_recipe("snapkv(budget=0.5) + think(ratio=0.5)").quantize == ThinK(ratio=0.5)
    assert kvlab.parse_recipe("dynamic_ntk(rerotate_cache=false) + think").quantize == ThinK()


@pytest.mark.parametrize(
    "recipe, fragments",
    [
        ("think(ratio=1.0)", ["think(ratio=1.0)", "[0, 1)"]),
        ("think(ratio=1.5)", ["think(ratio=1.5)", "[0, 1)"]),
        ("think(ratio=-0.1)", ["think(ratio=-0.1)", ">= 0.0"]),
        ("think(window=0)", ["think(window=0)", ">= 1"]),
        ("self_extend + think", ["think", "self_extend", "before RoPE", "yarn"]),
        ("dynamic_ntk + think", ["think", "dynamic_ntk", "rerotate_cache=false"]),
    ],
)
def test_bad_parameters_and_pre_rope_positions_are_refused_clearly(recipe, fragments):
    with pytest.raises(kvlab.RecipeError) as info:
        kvlab.parse_recipe(recipe)
    for fragment in fragments:
        assert fragment in str(info.value)


# -- in the engine ---------------------------------------------------------------------------
HEAD_DIM = 16  # the tiny models' head dim (2 KV heads, 2 layers, fp32)


@pytest.fixture(scope="module")
def engine():
    return tiny_engine(max_position_embeddings=2048)


def test_generation_stores_half_the_key_channels(engine):
    ids = prompt_ids(1000)
    full = engine.generate_ids(ids, "full", max_new_tokens=4)
    think = engine.generate_ids(ids, "think(ratio=0.5)", max_new_tokens=4)
    assert len(think.token_ids) == 4 and think.stats.kv_tokens == full.stats.kv_tokens == 1003
    # 3 decoded entries: storage grown once by 1 + a reserve of min(32, 1000 // 16) = 32
    full_layer = 2 * KV_HEADS * 1033 * HEAD_DIM * 4
    think_layer_bytes = (
        KV_HEADS * 1000 * 8 * 4 + KV_HEADS * 8  # pruned keys and their uint8 channels
        + KV_HEADS * 33 * HEAD_DIM * 4 + KV_HEADS * 1033 * HEAD_DIM * 4  # full-width, values
    )
    assert full.stats.kv_bytes == 2 * full_layer
    assert think.stats.kv_bytes == 2 * think_layer_bytes


def test_eviction_then_pruning(engine):
    ids = prompt_ids(1000)
    snap = engine.generate_ids(ids, "snapkv(budget=0.5)", max_new_tokens=1)
    both = engine.generate_ids(ids, "snapkv(budget=0.5) + think(ratio=0.5)", max_new_tokens=1)
    assert both.stats.kv_tokens == 500
    positions = KV_HEADS * 500 * 4  # int32 per KV head after per-head selection
    per_layer = KV_HEADS * (500 * 8 * 4 + 8 + 500 * HEAD_DIM * 4) + positions
    assert both.stats.kv_bytes == 2 * per_layer
    assert snap.stats.kv_bytes - both.stats.kv_bytes == 2 * KV_HEADS * (500 * 8 * 4 - 8)


def test_the_prefill_is_exact_and_ratio_zero_is_full(engine):
    ids, follow = prompt_ids(300), prompt_ids(16, seed=2)
    full_logits, full = teacher_logprobs(engine, "full", ids, follow)
    logits, pruned = teacher_logprobs(engine, "think(ratio=0.5)", ids, follow)
    torch.testing.assert_close(logits, full_logits)  # pruning happens at the prefill's end
    assert (pruned - full).abs().max() > 1e-4
    _, none = teacher_logprobs(engine, "think(ratio=0)", ids, follow)
    torch.testing.assert_close(none, full)


CONTEXT = "Alice keeps the red door code. The code of the red door is 4417. " * 20


@pytest.mark.parametrize("recipe", ["think(ratio=0.5)", "h2o(budget=0.5) + think(ratio=0.5)"])
def test_multi_request_session_rolls_back_to_the_pruned_context(tokenizer, recipe):
    engine = tiny_engine(
        tokenizer=tokenizer, vocab_size=len(tokenizer), max_position_embeddings=2048
    )
    session = engine.session(CONTEXT, recipe=recipe)  # h2o also evicts while decoding
    layers = session.sequence.layers
    context = [(layer.keys, layer.values, layer.key_positions(), layer.nbytes(), layer.seen)
               for layer in layers]
    assert all(layer.pruned for layer in layers)
    question = "What is the code of the red door?"
    first = session.ask(question, max_new_tokens=24)
    teacher = session.ask(question, max_new_tokens=24, teacher_tokens=first.token_ids)
    second = session.ask("Who keeps the code?", max_new_tokens=24)
    assert len(second.token_ids) > 0
    for layer, (keys, values, positions, nbytes, seen) in zip(layers, context):
        assert torch.equal(layer.keys, keys) and torch.equal(layer.values, values)
        assert torch.equal(layer.key_positions(), positions)
        assert layer.nbytes() == nbytes and layer.seen == seen and layer.pruned
    assert teacher.token_ids == first.token_ids  # rolled back to the question's mark exactly
    assert teacher.teacher_logprobs.argmax(-1).tolist() == first.token_ids


def test_engine_keeps_each_kv_heads_channels_of_largest_query_key_interaction():
    """Against the eager model: per KV head and channel, the mean ``q_c^2`` of the last
    ``window`` rotated queries summed over the head's query heads, times the mean ``k_c^2``
    of its keys; the top ``d - floor(ratio d)`` channels keep their exact values, the others
    read back as zeros."""
    from tests.compress.reference import assert_top_k, eager_run
    from tests.conftest import prompt_ids, tiny_engine

    n, ratio, window = 100, 0.5, 6
    ids = prompt_ids(n, seed=2)
    run = eager_run(ids)
    engine = tiny_engine()
    cache = prefilled(engine, f"think(ratio={ratio}, window={window})", ids)
    for index, layer in enumerate(cache.layers):
        keys = run.keys[index]  # [Hkv, n, d]
        q_power = run.grouped(run.rotated_queries[index][:, -window:].pow(2).mean(1), "sum")
        scores = q_power * keys.pow(2).mean(1)  # [Hkv, d]
        got = layer.keys[0]
        for h in range(keys.shape[0]):
            kept = [c for c in range(keys.shape[-1]) if bool(got[h, :, c].ne(0).any())]
            assert_top_k(kept, scores[h], keys.shape[-1] - int(ratio * keys.shape[-1]), tol=1e-6)
            torch.testing.assert_close(got[h][:, kept], keys[h][:, kept])

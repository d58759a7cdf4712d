"""WindowKV keeps whole windows, chosen once per group of layers, with budgets that decay by group."""

import math

import pytest
import torch

import kvlab
from kvlab.compress.windowkv import WindowKV, group_budgets
from kvlab.recipe import Recipe, parse_recipe
from tests.layers import probs_of, random_layer, rotary
from tests.conftest import assert_recipe_refused, prompt_ids, tiny_engine


LISTED = "windowkv(budget=30, suffix=8)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


ENTRY_BYTES = 2 * 2 * 16 * 4  # keys + values, 2 KV heads, head_dim 16, fp32 (tiny model)


def reference_keep(q, keys, budget, suffix, size, strategy, top=4):
    """WindowKV written out with loops (one layer group): per query head, the suffix votes;
    each window's score pooled over batch rows, heads and the window; the lowest windows go."""
    b, hq, n, d = q.shape
    hk = keys.shape[1]
    rot = rotary(d)
    review = n - suffix
    votes = {}  # (row, head) -> [review]
    for row in range(b):
        for h in range(hq):
            total = torch.zeros(review)
            for pos in range(review, n):
                total += probs_of(q[row, h, pos], pos, keys[row, h * hk // hq], rot)[:review]
            votes[row, h] = total
    scores = []
    for start in range(0, review, size):
        values = []
        for v in votes.values():
            window = v[start : start + size]
            if strategy == "average":
                values.extend(window.tolist())
            else:
                values.extend(window.topk(min(top, len(window))).values.tolist())
        scores.append(sum(values) / len(values))
    ranked = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable, as the reference
    drop = math.ceil((review - (budget - suffix)) / size)
    kept = sorted(ranked[: max(0, len(scores) - drop)])
    index = [j for w in kept for j in range(w * size, min((w + 1) * size, review))]
    return index + list(range(review, n))


@pytest.mark.parametrize("strategy", ["max", "average"])
@pytest.mark.parametrize("n, batch", [(71, 1), (64, 1), (69, 2)])
def test_keep_matches_the_reference(strategy, n, batch):
    ctx, q = random_layer(n=n, batch=batch, seed=n)
    keys_before, values_before = ctx.layer.keys.clone(), ctx.layer.values.clone()
    expected = reference_keep(q, keys_before, 30, 6, 8, strategy)
    WindowKV(budget=30, strategy=strategy, suffix=6).compress(q, ctx)
    assert ctx.layer.positions.tolist() == expected  # [k]: one set for all heads (and rows)
    torch.testing.assert_close(ctx.layer.keys, keys_before[:, :, expected])
    torch.testing.assert_close(ctx.layer.values, values_before[:, :, expected])


@pytest.mark.parametrize("strategy, kept", [("max", range(0, 8)), ("average", range(8, 16))])
def test_max_favours_a_sharp_peak_and_average_broad_attention(strategy, kept):
    """Window 0 holds one entry with 8x the weight of a plain entry; window 1 holds eight
    entries of 2x. Top-4 mean: 11/4 > 2 keeps window 0; mean: 15/8 < 2 keeps window 1."""
    ctx, q = random_layer(n=25, d=8, seed=3)
    q[:] = q[:1, :1, -1:]  # every query head asks the same
    target = rotary(8).rotate(q[:, :1, -1:], torch.tensor([24]))[0, 0, 0]
    unit = target * 8**0.5 / target.norm() ** 2  # a key c * unit has logit c
    ctx.layer.keys.zero_()
    ctx.layer.keys[:, :, 3] = math.log(8) * unit
    ctx.layer.keys[:, :, 8:16] = math.log(2) * unit
    WindowKV(budget=9, strategy=strategy, suffix=1).compress(q, ctx)
    assert ctx.layer.positions.tolist() == [*kept, 24]


def test_group_budgets_follow_the_reference():
    # reference (Llama, 32 layers, max_capacity_prompt 2048 review entries, beta 14): groups
    # 2926, 2341, 1756, 1170 (integer step); kvlab rounds each group: 1755 for the third
    budgets = group_budgets(2048 + 32, 32, 100_000, 32, 8, 14)
    assert budgets == [2926 + 32] * 8 + [2341 + 32] * 8 + [1755 + 32] * 8 + [1170 + 32] * 8
    assert group_budgets(40, 8, 160, 2, 8, 14) == [40, 40]  # one group: the budget
    # first > n_review (152): first = 152, last = 2 * 132 - 152 = 112
    assert group_budgets(140, 8, 160, 2, 1, 14) == [152 + 8, 112 + 8]


@pytest.mark.parametrize("budget, suffix, context, layers, shared, beta", [
    (2048, 32, 30000, 32, 8, 14), (2048, 16, 3000, 32, 8, 14), (256, 32, 1000, 30, 8, 14),
    (100, 16, 2000, 28, 8, 14), (512, 32, 600, 36, 4, 14), (64, 8, 5000, 26, 8, 16),
])
def test_groups_share_a_budget_and_the_mean_is_the_budget(budget, suffix, context, layers, shared, beta):
    budgets = group_budgets(budget, suffix, context, layers, shared, beta)
    groups = [budgets[g : g + shared] for g in range(0, layers, shared)]
    assert all(len(set(group)) == 1 for group in groups)  # one budget per group
    firsts = [group[0] for group in groups]
    assert firsts == sorted(firsts, reverse=True) and firsts[0] > firsts[-1]
    assert abs(sum(budgets) / layers - budget) <= 0.5  # the shift makes short last groups fit
    assert suffix <= budgets[-1] and budgets[0] <= context


def test_only_the_first_layer_of_a_group_scores_in_the_engine(monkeypatch):
    scored = []
    original = WindowKV.window_scores

    def counting(self, q_suffix, ctx, suffix):
        scored.append(ctx.index)
        return original(self, q_suffix, ctx, suffix)

    monkeypatch.setattr(WindowKV, "window_scores", counting)
    engine = tiny_engine(num_hidden_layers=4)
    recipe = "windowkv(budget=40, suffix=8, shared_layers=2, beta=4)"
    cache = engine.new_sequence(recipe)
    engine.prefill(cache, prompt_ids(160), compress=True)
    assert scored == [0, 2]
    # C = 32: last group C * 2 / 4 = 16 review entries, first 2C - 16 = 48; review 152 = 19 windows
    sizes = [layer.positions.shape for layer in cache.layers]
    assert sizes == [(56,), (56,), (24,), (24,)]
    positions = [layer.positions.tolist() for layer in cache.layers]
    assert positions[0] == positions[1] and positions[2] == positions[3]
    for kept in positions:
        assert kept[-8:] == list(range(152, 160))  # the suffix
        starts = {j // 8 for j in kept[:-8]}
        assert kept[:-8] == [j for w in sorted(starts) for j in range(8 * w, 8 * w + 8)]


def test_physical_size_in_the_engine():
    engine = tiny_engine(num_hidden_layers=4)
    ids = prompt_ids(160)
    whole = engine.generate_ids(ids, "full", max_new_tokens=1).stats
    assert whole.kv_bytes == 4 * 160 * ENTRY_BYTES  # no position tensor while contiguous
    small = engine.generate_ids(
        ids, "windowkv(budget=40, suffix=8, shared_layers=2, beta=4)", max_new_tokens=1
    ).stats
    assert small.kv_tokens == 40  # the mean over layers is the budget
    # keys + values of 56, 56, 24, 24 entries and one shared int32 position tensor [k] each
    assert small.kv_bytes == (56 + 56 + 24 + 24) * (ENTRY_BYTES + 4)


def test_a_follower_whose_leader_kept_everything_scores_for_itself():
    """Layers 0 and 1 of a 1-group model see the same entries: the follower reuses; a layer
    with another entry count than its leader chooses by itself."""
    ctx, q = random_layer(n=71, seed=2, index=1, num_layers=2)
    expected = reference_keep(q, ctx.layer.keys, 30, 6, 8, "max")
    WindowKV(budget=30, suffix=6).compress(q, ctx)  # no leader choice for this step
    assert ctx.layer.positions.tolist() == expected


def test_equals_full_when_the_budget_covers_the_context():
    engine = tiny_engine()
    ids = prompt_ids(100)
    full = engine.generate_ids(ids, "full", max_new_tokens=8)
    for recipe in ("windowkv(budget=1.0)", "windowkv(budget=100, strategy=average)"):
        roomy = engine.generate_ids(ids, recipe, max_new_tokens=8)
        assert roomy.token_ids == full.token_ids and roomy.stats.kv_bytes == full.stats.kv_bytes


def test_listed_with_paper_and_defaults():
    info = {m.name: m for m in kvlab.methods()}["windowkv"]
    assert info.stage == "compress" and "arXiv:2503.17922" in info.paper and info.summary
    params = {p.name: p for p in info.params}
    assert {k: params[k].default for k in params} == {
        "budget": 2048, "strategy": "max", "suffix": 0, "window_size": 8, "top": 0,
        "shared_layers": 8, "beta": 14.0,
    }
    assert params["strategy"].type == "max|average" and all(p.help for p in info.params)
    method = parse_recipe("windowkv(strategy=average)").compress
    assert (method.suffix_size, parse_recipe("windowkv").compress.suffix_size) == (16, 32)
    assert method.top_votes == 4 and isinstance(Recipe(compress=method).compress, WindowKV)


@pytest.mark.parametrize("text, fragment", [
    ("windowkv(strategy=min)", "max, average"), ("windowkv(beta=4)", "shared_layers=8"),
    ("windowkv(window_size=0)", ">= 1"),
])
def test_bad_parameters_are_refused(text, fragment):
    assert_recipe_refused(text, fragment)


def test_engine_keeps_the_best_whole_windows_of_the_eager_votes_per_layer_group_budget():
    """Two layers, one per group (``shared_layers=1``, ``beta=14``): C = 32 review entries on
    average, the last group C / 14, the first 2C - C / 14, so the layers may keep 62 and 2
    review entries (plus the suffix of 8); the review region (112 entries, 14 windows of 8)
    drops its ceil((112 - c) / 8) lowest-scored windows, each window scored by the mean over
    the query heads of their ``top`` largest suffix votes (max) or the mean vote (average)."""
    from tests.compress.reference import assert_top_k, eager_run

    n, budget, suffix, size = 120, 40, 8, 8
    ids = prompt_ids(n, seed=2)
    run = eager_run(ids)
    engine = tiny_engine()
    for strategy in ("max", "average"):
        cache = engine.new_sequence(
            f"windowkv(budget={budget}, suffix={suffix}, strategy={strategy}, shared_layers=1, beta=14)"
        )
        engine.prefill(cache, ids, compress=True)
        for index, (layer, allowed) in enumerate(zip(cache.layers, [62, 2])):
            review = n - suffix
            votes = run.probs[index][:, review:, :review].sum(1)  # [Hq, review]
            blocks = votes.reshape(votes.shape[0], review // size, size)
            if strategy == "max":
                scores = blocks.topk(size // 2, dim=-1).values.mean(dim=(0, 2))
            else:
                scores = blocks.mean(dim=(0, 2))
            keep_windows = review // size - math.ceil((review - allowed) / size)
            kept = layer.key_positions().tolist()  # one set for every head
            assert kept[-suffix:] == list(range(review, n))
            windows = sorted({j // size for j in kept[:-suffix]})
            assert kept[:-suffix] == [j for w in windows for j in range(w * size, w * size + size)]
            assert_top_k(windows, scores, keep_windows)

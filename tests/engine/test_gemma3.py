"""Gemma-3-style models: sliding-window (local) layers beside global ones.

A tiny random Gemma-3 text model (``Gemma3ForCausalLM`` built from a config: 4 layers, local
layers with a 16-token window and their own RoPE base, one global layer) is run by kvlab and,
as the reference, by transformers itself (eager attention, its own sliding-window masks,
rotary embeddings per layer type and ``DynamicCache``):

- ``full`` generates what transformers' ``generate`` generates, token for token and logits
  within float tolerance, on prompts longer than the window, in one-shot and chunked prefill;
  the window changes the answer there (a model without it answers differently);
- the local layers hold the last ``window - 1`` tokens only (the keys transformers' cache
  holds), their bytes bounded by the window, and a session's rollback brings back what an
  appended question slid out;
- position methods act on the global layers only: ``yarn`` equals transformers' model with
  YaRN in the global layers' rope parameters (and not in the local ones'); under
  ``self_extend`` every local layer's attention equals transformers' own attention module of
  that layer on the same input, while the global layers' differs;
- snapkv compresses the global layers (the top votes of transformers' attention plus the
  window), the local layers keep exactly their window; the methods that cannot run on such
  a model are refused with a RecipeError naming them, every other registered method runs;
- Qwen2's local layers (from ``max_window_layers`` on) and Mistral's (every layer) run the
  same way against transformers; a model without a global layer takes no method.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig
from transformers.cache_utils import DynamicCache

import kvlab
from kvlab.engine.cache import SlidingLayerKV, decode_reserve
from kvlab.engine.sampling import Sampling
from kvlab.recipe import parse_recipe
from tests.compress.reference import head_positions
from tests.compress.test_snapkv import assert_top_plus_window, engine_votes
from tests.conftest import prompt_ids, tiny_model

WINDOW = 16
LOCAL, GLOBAL = "sliding_attention", "full_attention"
LAYER_TYPES = [LOCAL, LOCAL, GLOBAL, LOCAL]
ROPE = {LOCAL: {"rope_type": "default", "rope_theta": 10_000.0}, GLOBAL: {"rope_type": "default", "rope_theta": 1_000_000.0}}
PROMPT, NEW = 60, 12


def gemma_config(**overrides) -> Gemma3TextConfig:
    settings = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        max_position_embeddings=512, sliding_window=WINDOW, layer_types=LAYER_TYPES,
        rope_parameters=copy.deepcopy(ROPE), eos_token_id=None,
    )
    return Gemma3TextConfig(**{**settings, **overrides})


def gemma_pair(seed: int = 0, **overrides) -> tuple[Gemma3ForCausalLM, Gemma3ForCausalLM]:
    """The same random weights twice: transformers' reference (eager) and the copy kvlab runs
    (kvlab's engine replaces the attention and rotary modules of the model it is given)."""
    torch.manual_seed(seed)
    reference = Gemma3ForCausalLM(gemma_config(**overrides)).eval()
    reference.set_attn_implementation("eager")
    return reference, copy.deepcopy(reference)


def with_config(model: Gemma3ForCausalLM, **overrides) -> Gemma3ForCausalLM:
    """``model``'s weights in a model built from its config with ``overrides``."""
    other = Gemma3ForCausalLM(gemma_config(**overrides)).eval()
    other.load_state_dict(model.state_dict())
    other.set_attn_implementation("eager")
    return other


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pair():
    return gemma_pair()


def engine_of(model, chunk: int = 1024) -> kvlab.Engine:
    return kvlab.Engine(model, progress=False, prefill_chunk=chunk)


@pytest.fixture(scope="module")
def engine(pair):
    return engine_of(copy.deepcopy(pair[1]))  # pair[1] stays untouched: each engine gets a copy


@pytest.fixture(scope="module")
def chunked(pair):
    """The composition test's engine settings: 32-token prefill chunks."""
    return engine_of(copy.deepcopy(pair[1]), chunk=32)


@torch.no_grad()
def hf_generate(model, ids: list[int], new: int):
    """transformers' greedy ``generate``; every prompt token attended (the random prompts hold
    the pad token 0, which ``generate`` would otherwise take for padding and re-position)."""
    input_ids = torch.tensor([ids])
    out = model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=new, do_sample=False,
        output_logits=True, return_dict_in_generate=True,
    )
    return out.sequences[0, len(ids):].tolist(), torch.stack([torch.log_softmax(x[0].float(), -1) for x in out.logits])


def kvlab_generate(engine, ids: list[int], new: int, recipe: str | None = None):
    sequence = engine.new_sequence(recipe)
    logits = engine.prefill(sequence, ids, compress=True)
    decoded = engine.decode(sequence, logits, new, Sampling().sampler(engine.device), keep_logprobs=True)
    return decoded.tokens, torch.stack(decoded.logprobs), sequence


# -- full: transformers' own generation --------------------------------------------------------
@pytest.mark.parametrize("chunk", [1024, 8, 13], ids=["one-shot", "chunks-of-8", "chunks-of-13"])
def test_full_generates_what_transformers_generates(pair, chunk):
    reference, model = pair
    ids = prompt_ids(PROMPT, seed=1)
    want_tokens, want_logprobs = hf_generate(reference, ids, NEW)
    engine = engine_of(copy.deepcopy(model), chunk)
    assert len(engine.chunks(PROMPT)) == (1 if chunk == 1024 else PROMPT // chunk + (PROMPT % chunk >= chunk // 2))
    tokens, logprobs, _ = kvlab_generate(engine, ids, NEW)
    assert tokens == want_tokens
    torch.testing.assert_close(logprobs, want_logprobs, atol=1e-4, rtol=1e-4)


def test_full_with_linearly_scaled_global_rope_as_in_gemma3_4b():
    """Gemma-3 4B-27B scale their global layers' RoPE linearly (factor 8), not the local
    layers': kvlab reads each layer type's rope parameters as transformers does."""
    rope = copy.deepcopy(ROPE)
    rope[GLOBAL].update({"rope_type": "linear", "factor": 8.0})
    reference, model = gemma_pair(seed=3, rope_parameters=rope)
    ids = prompt_ids(PROMPT, seed=8)
    want_tokens, want_logprobs = hf_generate(reference, ids, NEW)
    tokens, logprobs, _ = kvlab_generate(engine_of(model, chunk=16), ids, NEW)
    assert tokens == want_tokens
    torch.testing.assert_close(logprobs, want_logprobs, atol=1e-4, rtol=1e-4)


def test_the_prompt_is_long_enough_for_the_window_to_matter(pair):
    """Without the window (every layer global, or a window over the whole prompt) the same
    weights answer otherwise: the equality above is not the one of a model without windows."""
    reference, _ = pair
    ids = prompt_ids(PROMPT, seed=1)
    want, _ = hf_generate(reference, ids, NEW)
    assert hf_generate(with_config(reference, sliding_window=512), ids, NEW)[0] != want
    assert hf_generate(with_config(reference, layer_types=[GLOBAL] * 4), ids, NEW)[0] != want


def test_a_session_question_slides_context_out_and_a_rollback_brings_it_back(chunked):
    """An appended question moves the local windows past the context; rolled back to the
    context, the same question gets the same answer, which equals a fresh prefill of context
    and question together."""
    engine = chunked
    context, question = prompt_ids(40, seed=3), prompt_ids(24, seed=4)
    sequence = engine.new_sequence(None)
    engine.prefill(sequence, context, compress=True)
    mark = sequence.mark()
    answers = []
    for _ in range(2):
        logits = engine.prefill(sequence, question, compress=False)
        decoded = engine.decode(sequence, logits, 6, Sampling().sampler(engine.device), keep_logprobs=True)
        answers.append((decoded.tokens, torch.stack(decoded.logprobs)))
        assert sequence.layers[0].key_positions().tolist() == list(range(64 + 5 - WINDOW + 1, 64 + 5))
        sequence.rollback(mark)
        assert sequence.layers[0].key_positions().tolist() == list(range(40 - WINDOW + 1, 40))
    tokens, logprobs, _ = kvlab_generate(engine, context + question, 6)
    assert answers[0][0] == answers[1][0] == tokens
    torch.testing.assert_close(answers[0][1], logprobs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(answers[1][1], logprobs, atol=1e-4, rtol=1e-4)


# -- the window cache --------------------------------------------------------------------------
@torch.no_grad()
def hf_cache(reference, ids: list[int]) -> DynamicCache:
    cache = DynamicCache(config=reference.config)
    reference(torch.tensor([ids]), cache=cache, use_cache=True)
    return cache


def test_local_layers_hold_the_window_transformers_cache_holds_and_their_bytes_are_bounded(pair, engine):
    reference, _ = pair
    ids = prompt_ids(PROMPT, seed=1)
    tokens, _, sequence = kvlab_generate(engine, ids, NEW)
    seen = PROMPT + NEW - 1  # the last token is returned, not cached
    cache = hf_cache(reference, ids + tokens[:-1])
    per_entry = 2 * 2 * 16 * 4  # keys and values, 2 KV heads, head_dim 16, float32
    for index, (layer, kind) in enumerate(zip(sequence.layers, LAYER_TYPES)):
        want_keys, want_values = cache.layers[index].keys, cache.layers[index].values
        if kind == LOCAL:
            assert layer.num_entries == WINDOW - 1 == want_keys.shape[2]
            assert layer.key_positions().tolist() == list(range(seen - WINDOW + 1, seen))
            assert layer.nbytes() <= per_entry * WINDOW  # the kept window and the next token's place
        else:
            assert layer.num_entries == seen and layer.nbytes() >= per_entry * seen
        torch.testing.assert_close(layer.keys, want_keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer.values, want_values, atol=1e-5, rtol=1e-5)
    local = sum(layer.nbytes() for layer, kind in zip(sequence.layers, LAYER_TYPES) if kind == LOCAL)
    assert local <= 3 * per_entry * WINDOW < sequence.nbytes() - local  # 3 local layers < 1 global


def test_the_window_storage_slides_in_place_while_decoding_and_stays_bounded():
    """A 64-token window: prompt chunks replace the storage by the kept entries, decoding
    steps write into a reserve of ``decode_reserve(63, 1)`` entries and move the view; the
    layer always holds the last 63 tokens' keys, in storage of at most 64 + reserve."""
    window, d = 64, 4
    layer = SlidingLayerKV(window)
    reserve = decode_reserve(window - 1, 1)
    assert reserve > 0 and layer.storage_limit == window + reserve
    steps = [100, 30] + [1] * 3 * (reserve + 1) + [7] + [1] * 5
    keys = torch.randn(1, 2, sum(steps), d)
    seen, moved_in_place = 0, 0
    for t in steps:
        storage = layer._key_storage
        layer.append(keys[:, :, seen : seen + t], -keys[:, :, seen : seen + t], torch.arange(seen, seen + t))
        moved_in_place += t == 1 and layer._key_storage is storage
        seen += t
        layer.slide()
        kept = min(seen, window - 1)
        assert layer.num_entries == kept and layer.seen == seen
        assert layer.capacity <= layer.storage_limit
        assert torch.equal(layer.keys, keys[:, :, seen - kept : seen])
        assert torch.equal(layer.values, -keys[:, :, seen - kept : seen])
        assert layer.key_positions().tolist() == list(range(seen - kept, seen))
    assert moved_in_place >= 3 * reserve  # most decoding steps copy nothing
    with pytest.raises(AssertionError, match="consecutive"):
        layer.append(keys[:, :, :2], keys[:, :, :2], torch.tensor([seen + 1, seen + 2]))


# -- position methods act on the global layers only ----------------------------------------------
def test_yarn_equals_transformers_with_yarn_in_the_global_layers_only(pair):
    reference, model = pair
    ids = prompt_ids(PROMPT, seed=5)
    engine = engine_of(copy.deepcopy(model), chunk=16)
    tokens, logprobs, _ = kvlab_generate(engine, ids, NEW, "yarn(factor=4)")
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512,
            "beta_fast": 32.0, "beta_slow": 1.0}
    global_only = copy.deepcopy(ROPE)
    global_only[GLOBAL].update(yarn)
    want_tokens, want_logprobs = hf_generate(with_config(reference, rope_parameters=global_only), ids, NEW)
    assert tokens == want_tokens
    torch.testing.assert_close(logprobs, want_logprobs, atol=1e-4, rtol=1e-4)
    both = copy.deepcopy(global_only)
    both[LOCAL].update(yarn)
    _, other = hf_generate(with_config(reference, rope_parameters=both), ids, NEW)
    assert (other - want_logprobs).abs().max() > 1e-2  # YaRN in the local layers would show
    _, plain = hf_generate(reference, ids, NEW)
    assert (plain - want_logprobs).abs().max() > 1e-2  # and YaRN acts on the global layer


def sliding_mask(n: int, window: int | None) -> torch.Tensor:
    """transformers' additive mask ``[1, 1, n, n]``: causal, and ``q - k < window`` if given."""
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    allowed = (k <= q) if window is None else (k <= q) & (q - k < window)
    return torch.zeros(n, n).masked_fill(~allowed, float("-inf"))[None, None]


@torch.no_grad()
def test_self_extend_changes_the_global_layers_and_leaves_the_local_ones_as_trained(pair):
    """One prompt through kvlab with self_extend: each layer's attention input and output are
    captured, and transformers' own attention module of that layer (its RoPE for the layer
    type, its mask) is run on the same input. Every local layer's output equals it; the global
    layer's equals it inside Self-Extend's neighbour window and differs past it."""
    reference, model = pair
    n, neighbours = 48, 8
    engine = engine_of(copy.deepcopy(model))
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [
        layer.self_attn.register_forward_hook(
            lambda module, args, kwargs, out, i=i: captured.__setitem__(i, (kwargs["hidden_states"], out[0])),
            with_kwargs=True,
        )
        for i, layer in enumerate(engine.model.model.layers)
    ]
    try:
        engine.prefill(engine.new_sequence(f"self_extend(group_size=4, window={neighbours})"), prompt_ids(n, seed=6), compress=True)
    finally:
        for hook in hooks:
            hook.remove()
    positions = torch.arange(n)[None]
    for index, kind in enumerate(LAYER_TYPES):
        hidden, got = captured[index]
        cos_sin = reference.model.rotary_emb(hidden, positions, kind)
        mask = sliding_mask(n, WINDOW if kind == LOCAL else None)
        want, _ = reference.model.layers[index].self_attn(hidden, position_embeddings=cos_sin, attention_mask=mask)
        if kind == LOCAL:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(got[:, :neighbours], want[:, :neighbours], atol=1e-5, rtol=1e-5)
            assert (got[:, neighbours + 4 :] - want[:, neighbours + 4 :]).abs().amax() > 1e-3


# -- other stages: global layers only, or refused ---------------------------------------------------
def test_snapkv_compresses_the_global_layers_to_the_top_votes_and_leaves_the_windows(pair, engine):
    reference, _ = pair
    n, budget, window, kernel = PROMPT, 24, 8, 5
    ids = prompt_ids(n, seed=2)
    with torch.no_grad():
        out = reference(torch.tensor([ids]), output_attentions=True, use_cache=True)
    sequence = engine.new_sequence(f"snapkv(budget={budget}, window={window}, kernel={kernel})")
    engine.prefill(sequence, ids, compress=True)
    probs = [a[0] for a in out.attentions]
    group = 2
    for index, (layer, kind) in enumerate(zip(sequence.layers, LAYER_TYPES)):
        want_keys = out.past_key_values.layers[index].keys
        if kind == LOCAL:
            assert layer.num_entries == WINDOW - 1
            torch.testing.assert_close(layer.keys, want_keys, atol=1e-5, rtol=1e-5)
            continue
        heads = head_positions(layer)
        assert [len(kept) for kept in heads] == [budget, budget]
        votes = engine_votes(_Probs(probs, group), index, window, kernel)
        assert_top_plus_window(heads, votes, budget, window, n)
        for h, kept in enumerate(heads):
            torch.testing.assert_close(layer.keys[0, h], want_keys[0, h, kept], atol=1e-5, rtol=1e-5)


class _Probs:
    """The part of ``tests.compress.reference.EagerRun`` that SnapKV's votes read."""

    def __init__(self, probs: list[torch.Tensor], group: int) -> None:
        self.probs, self.group = probs, group

    def grouped(self, per_query_head: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
        return per_query_head.reshape(-1, self.group, *per_query_head.shape[1:]).mean(1)


REFUSED_ON_SLIDING = {
    "fastkv": "fastkv(tsp_rate=0.2, budget=30)",
    "duo_attention": "duo_attention(retrieval=0.0, sink=4, recent=26)",
    "pyramidkv": "pyramidkv(budget=30, window=8)",
    "windowkv": "windowkv(budget=30, suffix=8)",
    "lychee": "lychee(budget=32, block=8, retrieval=0.0)",
}
"""The methods refused on a model with sliding-window layers (their layer-spanning choices:
token propagation, head identification, budgets shared by depth, blocks reused from the
layer before); every other method acts on the global layers."""


@pytest.mark.parametrize("name", sorted(REFUSED_ON_SLIDING))
def test_methods_spanning_layers_are_refused_with_the_reason(engine, name):
    recipe = REFUSED_ON_SLIDING[name]
    with pytest.raises(kvlab.RecipeError, match=rf"^{name} is not supported on this model .*sliding-window layers \(3 of 4 layers attend over the last 16 tokens only\): .*; use "):
        engine.new_sequence(recipe)
    kvlab.Engine(tiny_model(), progress=False).new_sequence(recipe)  # a model without windows takes it


def test_gemfilter_filters_at_a_global_layer_only(engine):
    ids = prompt_ids(PROMPT, seed=7)
    with pytest.raises(kvlab.RecipeError, match=r"filters at layer 1 of 4, a sliding-window layer .*choose a filter_layer"):
        engine.prefill(engine.new_sequence("gemfilter(topk=30, filter_layer=0.25)"), ids, compress=True)
    sequence = engine.new_sequence("gemfilter(topk=30, filter_layer=0.5)")
    engine.prefill(sequence, ids, compress=True)
    assert sequence.layers[2].num_entries == 30 and sequence.layers[0].num_entries == WINDOW - 1


def test_every_other_method_runs_on_the_global_layers(chunked):
    """Every registered method but the refused ones runs a chunked context, a question and
    decoding on the Gemma model, and rolls back (the composition test's run)."""
    from tests.compress.test_listed import listed_setting
    from tests.test_composition import run

    ran = []
    for info in kvlab.methods():
        if info.name in REFUSED_ON_SLIDING or info.name == "full":
            continue
        recipe = parse_recipe("gemfilter(topk=40, filter_layer=0.5)" if info.name == "gemfilter" else listed_setting(info))
        run(chunked, recipe)
        ran.append(info.name)
    assert len(ran) >= 35


# -- the other sliding-window models: Qwen2 (local layers from max_window_layers on), Mistral (all) --
@pytest.mark.parametrize("arch, overrides, windows", [
    ("qwen2", dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1), [None, WINDOW, WINDOW]),
    ("mistral", dict(sliding_window=WINDOW), [WINDOW, WINDOW]),
], ids=["qwen2", "mistral"])
def test_other_sliding_window_models_generate_what_transformers_generates(arch, overrides, windows):
    reference = tiny_model(arch, **overrides)
    reference.set_attn_implementation("eager")
    engine = engine_of(copy.deepcopy(reference), chunk=8)
    assert engine.windows == windows
    ids = prompt_ids(PROMPT, seed=1)
    want_tokens, want_logprobs = hf_generate(reference, ids, NEW)
    tokens, logprobs, sequence = kvlab_generate(engine, ids, NEW)
    assert tokens == want_tokens
    torch.testing.assert_close(logprobs, want_logprobs, atol=1e-4, rtol=1e-4)
    assert [layer.num_entries for layer in sequence.layers] == [PROMPT + NEW - 1 if w is None else w - 1 for w in windows]
    unwindowed = tiny_model(arch, **{**overrides, "sliding_window": None, "use_sliding_window": False})
    unwindowed.set_attn_implementation("eager")
    assert hf_generate(unwindowed, ids, NEW)[1].sub(want_logprobs).abs().max() > 1e-2  # the window matters here


def test_a_model_without_global_layers_takes_no_method():
    """Mistral with a sliding window in every layer: no global layer for a method to act on."""
    engine = kvlab.Engine(tiny_model("mistral", sliding_window=WINDOW), progress=False)
    for recipe in ("snapkv(budget=30)", "yarn(factor=2)", "quest(budget=32)"):
        with pytest.raises(kvlab.RecipeError, match=r"^\w+ is not supported on this model .*\(2 of 2 layers attend over the last 16 tokens only\): .*has none.*use the recipe full"):
            engine.new_sequence(recipe)
    engine.new_sequence("full")
    wide = kvlab.Engine(tiny_model("mistral", sliding_window=256), progress=False)  # the trained length
    assert wide.windows == [None, None]


def test_softcapping_and_unknown_layer_types_are_refused():
    torch.manual_seed(0)
    with pytest.raises(kvlab.ModelError, match="attn_logit_softcapping=50.0"):
        kvlab.Engine(Gemma3ForCausalLM(gemma_config(attn_logit_softcapping=50.0)), progress=False)
    from types import SimpleNamespace

    from kvlab.engine.engine import check_architecture

    with pytest.raises(kvlab.ModelError, match=r"layer types \['chunked_attention'\]"):
        check_architecture(SimpleNamespace(model_type="gemma3_text", layer_types=["chunked_attention", LOCAL]))


# -- batched decoding (kvlab serve) -------------------------------------------------------------
@pytest.mark.parametrize("recipe", ["full", "yarn(factor=2)"])
def test_batched_decoding_on_forks_is_token_for_token_decoding_alone(chunked, recipe):
    """Engine.decode_step over forks of one context: local layers slide per row and rotate with
    the local RoPE, so each row answers as it would alone (the window matters at these lengths)."""
    engine = chunked
    stored = engine.new_sequence(recipe)
    engine.prefill(stored, prompt_ids(40, seed=3), compress=True)
    questions = [prompt_ids(n, seed=30 + n) for n in (5, 19, 11)]
    expected = []
    for q in questions:
        fork = stored.fork()
        logits = engine.prefill(fork, q, compress=False)
        expected.append(engine.decode(fork, logits, 12, Sampling().sampler(engine.device)).tokens)
    forks = [stored.fork() for _ in questions]
    logits = torch.stack([engine.prefill(f, q, compress=False) for f, q in zip(forks, questions)])
    got: list[list[int]] = [[] for _ in questions]
    for _ in range(12):
        step = [int(row.argmax()) for row in logits]
        for tokens, token in zip(got, step):
            tokens.append(token)
        logits = engine.decode_step(forks, step)
    assert got == expected
    assert len({tuple(t) for t in got}) > 1  # the rows are different questions, not one answer

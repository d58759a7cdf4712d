"""DuoAttention: retrieval heads keep every entry, streaming heads only sinks + recent ones; the
retrieval heads are those whose answer queries look furthest back in synthetic passkey probes."""

import json
import re

import pytest
import torch

import kvlab
from kvlab.compress import duo_heads
from kvlab.compress.duo_attention import DuoAttention, HeadSplit
from kvlab.compress.duo_heads import probe_prompts
from kvlab.compress.duo_probes import DEFAULT_PROBE_SET, PROBE_FAMILIES
from kvlab.engine.ragged import RaggedLayerKV
from kvlab.engine.sampling import Sampling
from kvlab.recipe import Recipe, parse_recipe
from tests.conftest import assert_recipe_refused, prompt_ids, tiny_engine, tiny_model


LISTED = "duo_attention(retrieval=0.0, sink=4, recent=26)"
"""A setting where the method must change what it says it changes on a 120-token prompt
of a 2-layer tiny model (run against ``full`` by tests/compress/test_listed.py)."""


SINK, RECENT = 4, 28
WINDOW = SINK + RECENT
SMALL = dict(sink=SINK, recent=RECENT, probes=2, probe_length=128)
PEAKY = dict(initializer_range=0.2, num_hidden_layers=3)  # heads that differ clearly
HEAD_ENTRY = 2 * 16 * 4  # keys + values of one entry in one KV head: head_dim 16, fp32


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    """Every test identifies into its own cache directory, with an empty in-memory cache."""
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(duo_heads, "_SCORES", {})
    return tmp_path


def no_identification(monkeypatch):
    def refuse(engine, settings):
        raise AssertionError("identification ran again")

    monkeypatch.setattr(duo_heads, "measure_heads", refuse)


def reference_scores(seed, method):
    """The identification written out: the same model run by transformers' own eager attention;
    per KV head, the probability that each answer query at ``p`` puts on the spans the answer
    needs (``needle``) or on positions ``sink..p - recent`` (``far``), averaged over its two
    query heads, the answer queries and the probes."""
    engine = tiny_engine(seed=seed, **PEAKY)
    model = tiny_model(seed=seed, **PEAKY)
    model.set_attn_implementation("eager")
    prompts = probe_prompts(engine, method.identification(engine))
    total = torch.zeros(3, 2)
    for probe in prompts:
        n, answer = len(probe.ids), probe.answer
        with torch.no_grad():
            attentions = model(torch.tensor([probe.ids]), output_attentions=True).attentions
        for layer, probs in enumerate(attentions):  # [1, 4 query heads, n, n]
            for kv in range(2):
                masses = []
                for hq in (2 * kv, 2 * kv + 1):
                    for p in range(n - answer, n):
                        if method.score == "needle":
                            spans = probe.spans
                        else:
                            spans = [(method.sink, p - method.recent + 1)]
                        masses.append(sum(float(probs[0, hq, p, lo:hi].sum()) for lo, hi in spans))
                total[layer, kv] += sum(masses) / len(masses)
    return total / len(prompts)


@pytest.mark.parametrize("score, probe_set", [
    ("needle", "passkey"), ("far", "passkey"), ("needle", "multikey,multihop"), ("far", DEFAULT_PROBE_SET),
])
def test_identification_matches_a_reference_and_takes_the_global_top_share(score, probe_set):
    method = DuoAttention(retrieval=0.5, score=score, probe_set=probe_set, **SMALL)
    engine = tiny_engine(seed=0, **PEAKY)
    split = method.prepare(engine)
    reference = reference_scores(0, method)
    assert split.scores.shape == (3, 2)
    torch.testing.assert_close(split.scores, reference, atol=1e-4, rtol=1e-4)
    top = set(reference.flatten().topk(3).indices.tolist())  # 50% of the model's 6 KV heads
    chosen = {layer * 2 + h for layer, row in enumerate(split.retrieval) for h, r in enumerate(row) if r}
    assert chosen == top
    shares = {r: sum(map(sum, DuoAttention(retrieval=r, score=score, probe_set=probe_set, **SMALL).prepare(engine).retrieval))
              for r in (0.2, 0.5, 0.9)}
    assert shares == {0.2: 1, 0.5: 3, 0.9: 5}  # rounded share of all heads, every layer together


def test_random_probes_hide_the_needle_outside_the_window_and_repeat_it_at_the_end():
    engine = tiny_engine()
    settings = DuoAttention(probe_set="passkey", **SMALL).identification(engine)
    prompts = probe_prompts(engine, settings)
    starts = []
    for probe in prompts:
        ids, answer = probe.ids, probe.answer
        assert len(ids) == 128 and answer == 8
        needle = ids[-7:]  # the repeat (its last token is what the last query predicts)
        start = next(i for i in range(len(ids) - 7) if ids[i : i + 7] == needle)
        assert probe.needle == (start, start + 8)
        assert SINK <= start and start + 8 <= len(ids) - answer - RECENT + 1  # outside every window
        starts.append(start)
    assert starts[0] < starts[1]  # the needle at several depths


def test_text_probes_ask_for_a_pass_key_hidden_in_prose(tokenizer):
    engine = tiny_engine(tokenizer=tokenizer, vocab_size=len(tokenizer), max_position_embeddings=2048)
    settings = DuoAttention(sink=4, recent=64, probes=3, probe_length=300, probe_set="passkey").identification(engine)
    starts = []
    for probe in probe_prompts(engine, settings):
        ids, answer = probe.ids, probe.answer
        assert len(ids) == 300
        text = tokenizer.decode(ids)
        key = text[text.index(". Remember it.") - 5 : text.index(". Remember it.")]
        assert key.isdigit() and f"The pass key is {key}. Remember it. {key} is the pass key." in text
        assert text.endswith("The pass key is " + key[:-1])  # the answer fed but its last digit
        assert answer == 5  # SmolLM2 writes one token per digit: five answer queries
        digits = tokenizer(key, add_special_tokens=False)["input_ids"]
        start = next(i for i in range(300) if ids[i : i + 5] == digits)
        assert probe.needle[0] < start < probe.needle[1]  # the key is inside the needle
        assert 4 <= probe.needle[0] and probe.needle[1] <= 300 - answer - 64 + 1  # outside the window
        starts.append(start)
    assert starts == sorted(starts) and len(set(starts)) == 3  # at three depths


def test_scores_are_kept_on_disk_and_reloaded(cache_dir, monkeypatch):
    engine = tiny_engine(seed=0, **PEAKY)
    first = DuoAttention(retrieval=0.5, **SMALL).prepare(engine)
    files = list((cache_dir / "duo_attention").glob("*.json"))
    assert len(files) == 1
    stored = json.loads(files[0].read_text())
    assert stored["settings"] == {"sink": SINK, "recent": RECENT, "probes": 2, "length": 128, "score": "needle",
                                  "probe_set": DEFAULT_PROBE_SET}
    assert torch.equal(torch.tensor(stored["scores"]), first.scores)

    no_identification(monkeypatch)
    monkeypatch.setattr(duo_heads, "_SCORES", {})  # a new process: only the file is left
    again = DuoAttention(retrieval=0.5, **SMALL).prepare(tiny_engine(seed=0, **PEAKY))
    assert again.retrieval == first.retrieval and torch.equal(again.scores, first.scores)
    other_share = DuoAttention(retrieval=0.2, **SMALL).prepare(engine)  # a new split, no new run
    assert torch.equal(other_share.scores, first.scores)
    files[0].unlink()
    assert torch.equal(DuoAttention(retrieval=0.5, **SMALL).prepare(engine).scores, first.scores)  # memory
    with pytest.raises(AssertionError, match="identification ran again"):  # another random model
        DuoAttention(retrieval=0.5, **SMALL).prepare(tiny_engine(seed=1, **PEAKY))
    for other in ({"probes": 3}, {"score": "far"}, {"recent": 20}, {"probe_set": "passkey"}):  # other settings
        with pytest.raises(AssertionError, match="identification ran again"):
            DuoAttention(retrieval=0.5, **{**SMALL, **other}).prepare(engine)


def test_streaming_heads_keep_sinks_and_recent_entries_physically():
    engine = tiny_engine()
    method = DuoAttention(retrieval=0.25, **SMALL)  # one retrieval head of four: one mixed layer
    full = engine.new_sequence("full")
    cache = engine.new_sequence(Recipe(compress=method))
    split = cache.prepared["compress"]
    ids = prompt_ids(150)
    engine.prefill(full, ids, compress=True)
    engine.prefill(cache, ids, compress=True)
    expected_bytes = 0
    streaming_positions = list(range(SINK)) + list(range(150 - RECENT, 150))
    for layer, whole, retrieval in zip(cache.layers, full.layers, split.retrieval):
        assert isinstance(layer, RaggedLayerKV)
        if all(retrieval):
            expected_bytes += 2 * 150 * HEAD_ENTRY
        elif not any(retrieval):  # every head streaming: one rectangular selection
            assert not layer.is_ragged and layer.positions.tolist() == streaming_positions
            torch.testing.assert_close(layer.keys, whole.keys[:, :, streaming_positions])
            expected_bytes += 2 * WINDOW * HEAD_ENTRY + WINDOW * 4  # one shared position tensor
        else:
            assert layer.is_ragged
            for h, (head, keeps_all) in enumerate(zip(layer.heads, retrieval)):
                kept = list(range(150)) if keeps_all else streaming_positions
                assert head.key_positions().tolist() == kept
                assert torch.equal(head.keys[0, 0], whole.keys[0, h, kept])
                assert torch.equal(head.values[0, 0], whole.values[0, h, kept])
                # a retrieval head of a never-evicted layer stores no position tensor
                expected_bytes += 150 * HEAD_ENTRY if keeps_all else WINDOW * (HEAD_ENTRY + 4)
    assert sorted(sum(map(list, split.retrieval), [])) == [False, False, False, True]
    assert cache.nbytes() == expected_bytes
    assert full.nbytes() - cache.nbytes() == 3 * (150 - WINDOW) * HEAD_ENTRY - 2 * WINDOW * 4


def test_all_retrieval_is_full_and_all_streaming_is_streaming_llm(monkeypatch):
    no_identification(monkeypatch)  # a share of 0 or 1 needs no identification
    engine = tiny_engine()
    ids = prompt_ids(120)
    full = engine.generate_ids(ids, "full", max_new_tokens=10)
    whole = engine.generate_ids(ids, "duo_attention(retrieval=1.0)", max_new_tokens=10)
    assert whole.token_ids == full.token_ids and whole.stats.kv_bytes == full.stats.kv_bytes

    streaming = engine.new_sequence(f"duo_attention(retrieval=0.0, sink={SINK}, recent={RECENT})")
    reference = engine.new_sequence(f"streaming_llm(budget={WINDOW}, sink={SINK})")
    engine.prefill(streaming, ids, compress=True)
    engine.prefill(reference, ids, compress=True)
    for a, b in zip(streaming.layers, reference.layers):
        assert a.positions.tolist() == b.positions.tolist() and torch.equal(a.keys, b.keys)
    # fewer than evict_every (16) decoding steps: nothing evicted yet, as for streaming_llm
    duo = engine.generate_ids(ids, f"duo_attention(retrieval=0.0, sink={SINK}, recent={RECENT})", max_new_tokens=10)
    streamed = engine.generate_ids(ids, f"streaming_llm(budget={WINDOW}, sink={SINK})", max_new_tokens=10)
    assert duo.token_ids == streamed.token_ids and duo.stats.kv_bytes == streamed.stats.kv_bytes


@pytest.mark.parametrize("evict_every, steps", [(16, 1000), (1, 100)])
def test_streaming_heads_stay_bounded_while_retrieval_heads_grow(monkeypatch, evict_every, steps):
    engine = tiny_engine(num_hidden_layers=1, max_position_embeddings=2048)
    engine.stop_ids = set()  # a random model may draw its eos token
    recipe = Recipe(compress=DuoAttention(retrieval=0.5, evict_every=evict_every, **SMALL))
    history = []
    original = DuoAttention.after_decode_step

    def recording(self, q, ctx):
        original(self, q, ctx)
        history.append((int(ctx.positions[-1]), ctx.layer.head_entries()))

    monkeypatch.setattr(DuoAttention, "after_decode_step", recording)
    cache = engine.new_sequence(recipe)
    (retrieval,) = cache.prepared["compress"].retrieval
    assert sorted(retrieval) == [False, True]  # one head of each kind: a ragged layer
    r, s = retrieval.index(True), retrieval.index(False)
    logits = engine.prefill(cache, prompt_ids(100), compress=True)
    sampler = Sampling().sampler(engine.device)
    retrieval_head = cache.layers[0].heads[r]
    assert len(engine.decode(cache, logits, steps, sampler).tokens) == steps
    assert len(history) == steps - 1  # the last token is returned, not run
    for position, entries in history:
        assert entries[r] == position + 1  # the retrieval head holds every token so far
        assert WINDOW <= entries[s] <= WINDOW + evict_every - 1
        assert entries[s] - WINDOW == (position + 1 - 100) % evict_every  # evicts on time
    streaming = cache.layers[0].heads[s].key_positions().tolist()
    seen = history[-1][0] + 1
    assert streaming[:SINK] == list(range(SINK)) and streaming[SINK:] == list(range(seen - len(streaming) + SINK, seen))
    assert cache.layers[0].heads[r] is retrieval_head  # retrieval heads are never copied


def test_a_multi_request_session_comes_back_to_the_context_cache(tokenizer, monkeypatch):
    from tests.reuse.test_session import CONTEXT

    engine = tiny_engine(tokenizer=tokenizer, vocab_size=len(tokenizer), max_position_embeddings=2048)
    recipe = "duo_attention(retrieval=0.5, sink=4, recent=32, evict_every=1, probes=2, probe_length=256)"
    session = engine.session(CONTEXT, recipe=recipe, mode="multi-request")
    assert session.context_stats.prefilled_tokens == engine.counters.prefilled_tokens  # probes uncounted

    def state(cache):
        return [[(h.keys.clone(), h.values.clone(), h.key_positions().clone()) for h in layer.heads]
                for layer in cache.layers]

    before = state(session.sequence)
    assert any(not all(r) and any(r) for r in session.sequence.prepared["compress"].retrieval)
    evictions = []
    original = RaggedLayerKV.select_per_head
    monkeypatch.setattr(
        RaggedLayerKV, "select_per_head", lambda self, keep: evictions.append(1) or original(self, keep)
    )
    first = session.ask("What is the code of the red door?", max_new_tokens=12)
    assert evictions  # streaming heads evicted while answering
    after = state(session.sequence)
    for layer_before, layer_after in zip(before, after):
        for (k0, v0, p0), (k1, v1, p1) in zip(layer_before, layer_after):
            assert torch.equal(k0, k1) and torch.equal(v0, v1) and torch.equal(p0, p1)
    again = session.ask("What is the code of the red door?", max_new_tokens=12)
    assert again.token_ids == first.token_ids


def test_listed_with_paper_and_defaults():
    info = {m.name: m for m in kvlab.methods()}["duo_attention"]
    assert info.stage == "compress" and "arXiv:2410.10819" in info.paper and info.summary
    params = {p.name: p for p in info.params}
    assert {k: p.default for k, p in params.items()} == {
        "retrieval": 0.5, "sink": 128, "recent": 256, "evict_every": 16, "score": "needle",
        "probes": 8, "probe_set": "passkey,words,multikey,multihop", "probe_length": 1024,
    }
    assert all(p.help for p in info.params)
    assert isinstance(parse_recipe("duo_attention").compress, DuoAttention)


@pytest.mark.parametrize("text, fragment", [
    ("duo_attention(retrieval=1.5)", "retrieval=1.5"), ("duo_attention(retrieval=-0.1)", ">= 0.0"),
    ("duo_attention(recent=0)", "recent=0"), ("duo_attention(sink=-1)", ">= 0"),
    ("duo_attention(evict_every=0)", "evict_every=0"), ("duo_attention(probes=0)", "probes=0"),
    ("duo_attention(probe_length=400)", "probe_length=400"), ("duo_attention(score=near)", "needle, far"),
    ("duo_attention(probe_set=digits)", "passkey, words, multikey, multihop"),
    ("duo_attention(probe_set='passkey,,words')", "unknown probe family ''"),
    ("duo_attention(probe_set='words,words')", "named twice"), ("duo_attention(probe_set=3)", "must be a string"),
    ("duo_attention(probe_set='')", "at least one probe family"),
    ("duo_attention + kivi", "duo_attention keeps a different number"),
    ("duo_attention + quest", "duo_attention keeps a different number"),
])
def test_bad_parameters_and_combinations_are_refused(text, fragment):
    assert_recipe_refused(text, fragment)


def test_a_probe_longer_than_the_model_was_trained_for_is_capped_or_refused():
    engine = tiny_engine()  # trained length 256
    assert DuoAttention(**{**SMALL, "probe_length": 4096}).identification(engine).length == 256
    with pytest.raises(kvlab.RecipeError, match="trained length 256"):
        engine.new_sequence("duo_attention")  # sink 128 + recent 256 do not fit 256 tokens
    assert isinstance(engine.new_sequence("duo_attention(retrieval=0.0)").prepared["compress"], HeadSplit)


# -- probe families (kvlab/compress/duo_probes.py) ------------------------------------------------
def test_the_probe_set_is_validated_and_kept_in_canonical_order():
    assert DuoAttention().probe_set == "passkey,words,multikey,multihop"  # the mix by default
    assert DuoAttention(probe_set=" multihop , passkey").probe_set == "passkey,multihop"
    assert parse_recipe("duo_attention(probe_set=words)").compress.probe_set == "words"
    with pytest.raises(kvlab.RecipeError, match="use a comma-separated list of passkey, words, multikey, multihop"):
        DuoAttention(probe_set="passkey,names")


ASKED = {  # family -> (question, answer prefix) patterns of its text probes
    "passkey": (r"What is the pass key\?", r"The pass key is"),
    "words": (r"What pet does (\w+) keep\?", r"(\w+) keeps a pet"),
    "multikey": (r"What is the pass key of the (\w+) box\?", r"The pass key of the (\w+) box is"),
    "multihop": (r"Which animal is on the door of the house (\w+) lives in\?", r"The door of (\w+)'s house has a"),
}


@pytest.mark.parametrize("family", PROBE_FAMILIES)
def test_each_text_probe_family_asks_a_question_its_needles_answer(tokenizer, family):
    """Each probe asks its family's question; the answer is written in the needle the probe
    names and follows from the counted spans (never from a distractor); the prompt ends with
    the answer prefix and the answer but its last token, so the last ``answer`` queries
    predict the answer's tokens; every counted span lies outside the answer queries' window."""
    engine = tiny_engine(tokenizer=tokenizer, vocab_size=len(tokenizer), max_position_embeddings=2048)
    settings = DuoAttention(sink=16, recent=64, probes=2, probe_length=600, probe_set=family).identification(engine)
    prompts = probe_prompts(engine, settings)
    assert [p.family for p in prompts] == [family, family]
    assert prompts[0].expected != prompts[1].expected and all(p.expected for p in prompts)
    question_re, prefix_re = ASKED[family]
    for probe in prompts:
        ids, answer = probe.ids, probe.answer
        assert len(ids) == 600 and answer >= 1
        body, asked = tokenizer.decode(ids).rsplit("\n\n", 1)
        question = re.match(question_re, asked)
        assert question, asked
        fed = tokenizer.decode(ids[len(ids) - answer + 1 :]) if answer > 1 else ""
        prefix = tokenizer.decode(ids[: len(ids) - answer + 1])
        assert re.search(prefix_re + "$", prefix.rstrip(" ")), prefix[-60:]
        # the answer's first tokens are fed, its last one is what the last query predicts
        assert probe.expected.startswith(fed.lstrip(" ")) and len(fed.lstrip(" ")) < len(probe.expected)
        assert answer == len(tokenizer(" " + probe.expected, add_special_tokens=False)["input_ids"]) or (
            answer == len(tokenizer(probe.expected, add_special_tokens=False)["input_ids"]))
        assert probe.needle in probe.spans
        assert probe.expected in tokenizer.decode(ids[slice(*probe.needle)])
        assert body.count(probe.expected) == sum(tokenizer.decode(ids[a:b]).count(probe.expected) for a, b in probe.spans)
        for lo, hi in probe.spans:
            assert 16 <= lo and hi <= 600 - answer - 64 + 1  # outside every answer query's window
        spans = [tokenizer.decode(ids[a:b]) for a, b in probe.spans]
        if family == "passkey":
            assert spans == [f" The pass key is {probe.expected}. Remember it. {probe.expected} is the pass key. "]
        elif family == "words":
            assert spans == [f" {question.group(1)} keeps a pet {probe.expected}. Remember it: the pet of "
                             f"{question.group(1)} is a {probe.expected}. "]
        elif family == "multikey":
            keys = dict(re.findall(r"The pass key of the (\w+) box is (\d{5})\.", body))
            assert len(keys) == 4 and len(set(keys.values())) == 4  # three distractors
            assert keys[question.group(1)] == probe.expected
            assert spans == [f" The pass key of the {question.group(1)} box is {probe.expected}. "]
        else:
            name = question.group(1)
            (colour,) = re.findall(rf"{name} lives in the (\w+) house\.", body)
            assert spans == [f" {name} lives in the {colour} house. ", f" The {colour} house has a {probe.expected} on its door. "]


def test_random_probe_families_repeat_what_their_counted_needles_hold():
    """Tokenizer-less analogues: the answer tokens (the last ``answer`` queries predict them)
    stand in the counted spans; multikey has three uncounted distractors, multihop two hops."""
    engine = tiny_engine()
    settings = DuoAttention(**{**SMALL, "probes": 8}).identification(engine)
    prompts = probe_prompts(engine, settings)
    assert [p.family for p in prompts] == list(PROBE_FAMILIES) * 2  # the mix, cycled
    assert len({tuple(p.ids) for p in prompts}) == 8
    for probe in prompts:
        ids, answer = probe.ids, probe.answer
        assert len(ids) == 128
        target = ids[-answer + 1 :] if answer > 1 else []
        needle = ids[slice(*probe.needle)]
        assert needle[len(needle) - answer : len(needle) - 1] == target  # the needle ends with the answer
        assert {"passkey": 8, "words": 2, "multikey": 4, "multihop": 6}[probe.family] == answer
        assert len(probe.spans) == (2 if probe.family == "multihop" else 1)
        for lo, hi in probe.spans:
            assert SINK <= lo and hi <= 128 - answer - RECENT + 1


def test_the_probe_set_chooses_the_probes_and_the_cache_file(cache_dir, monkeypatch):
    """One probe set: the same probes and scores every time, one cache file; another set:
    other probes, other scores, its own file; the order of the names does not matter."""
    engine = tiny_engine(seed=0, **PEAKY)
    sets = {"passkey": "passkey", "mix": DEFAULT_PROBE_SET, "words": "words,multihop"}
    ids = {k: [p.ids for p in probe_prompts(engine, DuoAttention(probe_set=v, **SMALL).identification(engine))]
           for k, v in sets.items()}
    assert ids["passkey"] != ids["mix"] and ids["mix"] != ids["words"] and ids["passkey"] != ids["words"]
    assert ids["passkey"][0] == ids["mix"][0]  # probe 0 of the mix is the passkey probe
    scores = {k: DuoAttention(retrieval=0.5, probe_set=v, **SMALL).prepare(engine).scores for k, v in sets.items()}
    files = sorted((cache_dir / "duo_attention").glob("*.json"))
    assert len(files) == 3
    assert sorted(json.loads(f.read_text())["settings"]["probe_set"] for f in files) == sorted(sets.values())
    assert not torch.allclose(scores["passkey"], scores["mix"]) and not torch.allclose(scores["mix"], scores["words"])

    monkeypatch.setattr(duo_heads, "_SCORES", {})  # a new process: measured again, the same numbers
    for f in files:
        f.unlink()
    for k, v in sets.items():
        assert torch.equal(DuoAttention(retrieval=0.5, probe_set=v, **SMALL).prepare(engine).scores, scores[k])
    no_identification(monkeypatch)
    same = DuoAttention(retrieval=0.5, probe_set="multihop, words", **SMALL).prepare(engine)  # from the cache
    assert torch.equal(same.scores, scores["words"]) and len(list((cache_dir / "duo_attention").glob("*.json"))) == 3

"""DPE's calibration: the paper's needle sweep of group scales, kept on disk per model."""

import json
import shutil

import pytest
import torch

import kvlab
from kvlab.compress.duo_probes import Probe
from kvlab.engine.forward import Phase
from kvlab.position import dpe_search
from kvlab.position.dpe import DPE
from kvlab.position.dpe_search import Calibration, Score, Search
from tests.conftest import prompt_ids, tiny_engine


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    """An empty calibration cache on disk and in memory for every test."""
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(dpe_search, "_CALIBRATED", {})


def small_search(engine, **overrides):
    settings = dict(length=96, window=16, groups=2, probes=1, candidates=(1, 2))
    return dpe_search.search_settings(engine, **{**settings, **overrides})


def test_the_search_picks_the_scale_a_constructed_score_prefers():
    """One group at a time, the others held: the chosen scale of each group is the one the
    score prefers for that group (accuracy first, then log-probability, then the smaller)."""
    search = Search(length=4096, window=256, groups=4, probes=1, probe_set="passkey",
                    candidates=(1, 2, 4, 8, 16), held=32)
    preferred = (4, 1, 16, 2)
    seen = []

    def evaluate(scales):
        seen.append(scales)
        varied = [g for g, s in enumerate(scales) if s != search.held]
        group = varied[0] if varied else None
        if group is None or scales[group] != preferred[group]:
            return Score(0.0, -abs(scales[group or 0] - 8) if group == 3 else -5.0)
        return Score(1.0, -1.0)

    scales, table = dpe_search.search_scales(search, evaluate)
    assert scales == preferred
    assert len(seen) == len(table) == 4 * 5
    for scales_tried in seen:  # exactly one group away from the held scale
        assert sum(s != search.held for s in scales_tried) <= 1
    # ties on accuracy: the higher log-probability; ties on both: the smaller scale
    flat = lambda s: Score(0.5, -abs(s[1] - 2) if s[1] != search.held else 0.0)  # noqa: E731
    assert dpe_search.search_scales(search, flat)[0] == (1, 2, 1, 1)


def test_candidates_and_held_scale_follow_the_paper():
    assert dpe_search.candidate_scales(131072, 1024) == (1, 2, 4, 8, 16, 32, 64, 128)
    assert dpe_search.candidate_scales(16384, 1024) == (1, 2, 4, 8, 16)
    engine = tiny_engine()  # trained length 256
    search = dpe_search.search_settings(engine, length=1024, window=64)
    assert search.candidates == (1, 2, 4, 8, 16) and search.held == 2 * 1024 // 256
    assert search.groups == 8 and search.probe_set == "passkey,words,multikey,multihop"


@pytest.mark.parametrize("overrides, fragment", [
    (dict(groups=3), "must divide the model's 8 RoPE dimension pairs"),
    (dict(length=60), "length >= window"),
    (dict(candidates=(0, 2)), "integers >= 1"),
    (dict(probe_set="passkey,cities"), "unknown probe family 'cities'"),
])
def test_bad_settings_are_refused(overrides, fragment):
    with pytest.raises(kvlab.RecipeError, match=fragment):
        small_search(tiny_engine(), **overrides)


def test_probes_too_short_for_their_needles_are_refused_in_dpe_terms(tokenizer):
    engine = tiny_engine(vocab_size=len(tokenizer), tokenizer=tokenizer)
    search = small_search(engine, length=130, window=66, probe_set="multikey")  # four needles
    with pytest.raises(kvlab.RecipeError, match="dpe calibration length=130: .* raise --length or lower --window"):
        dpe_search.probe_prompts(engine, search)


def greedy(engine, recipe, ids, count):
    sequence = engine.new_sequence(recipe)
    logits = engine.prefill(sequence, ids, compress=True)
    tokens = []
    for _ in range(count):
        tokens.append(int(logits.argmax()))
        logits = engine.forward(sequence, [tokens[-1]], Phase.DECODE)
    return tokens


def test_needle_score_is_greedy_exact_match_of_the_answer_under_the_scales():
    engine = tiny_engine()
    context = prompt_ids(90, seed=4)
    answer = greedy(engine, "dpe(scales=[1, 4], window=16)", context, 3)
    right = Probe("passkey", context + answer[:-1], 3, (0, 0), (), "", tuple(answer))
    wrong = Probe("passkey", context + answer[:-1], 3, (0, 0), (), "", (*answer[:-1], (answer[-1] + 1) % 256))
    alone = dpe_search.needle_score(engine, [right], (1, 4), 16)
    assert alone.accuracy == 1.0
    score = dpe_search.needle_score(engine, [right, wrong], (1, 4), 16)
    assert score.accuracy == 0.5 and score.logprob < alone.logprob < 0
    other = dpe_search.needle_score(engine, [right], (8, 8), 16)  # the scales reach the score
    assert abs(other.logprob - alone.logprob) > 1e-4


def test_a_calibration_round_trips_and_runs_as_dpe():
    engine = tiny_engine()
    result = dpe_search.calibrate(engine, small_search(engine))
    assert len(result.table) == 2 * 2 and all(s in (1, 2) for s in result.scales) and result.seconds > 0
    stored = json.loads(dpe_search.calibration_path(engine).read_text())
    assert stored["calibrations"][0]["scales"] == list(result.scales)
    dpe_search._CALIBRATED.clear()  # a new process: only the file is left
    assert dpe_search.calibrated_scales(engine, 16) == result.scales
    assert dpe_search.calibrations(engine)[0] == result

    recipe = kvlab.parse_recipe("dpe(scales=calibrated, window=16)")
    assert str(recipe) == "dpe(scales='calibrated', window=16)"
    given = f"dpe(scales={list(result.scales)}, window=16)"
    ids = prompt_ids(80, seed=5)
    got = engine.teacher_force(s := engine.new_sequence(recipe), engine.prefill(s, ids[:70], compress=True), ids[70:])
    want = engine.teacher_force(s := engine.new_sequence(given), engine.prefill(s, ids[:70], compress=True), ids[70:])
    torch.testing.assert_close(got, want)
    assert engine.context_window(recipe) == (256 - 16) * max(result.scales) + 16


def test_a_new_search_of_the_same_settings_replaces_its_entry_and_the_longest_length_wins():
    engine = tiny_engine()
    short, long = small_search(engine), small_search(engine, length=200)
    dpe_search.store(engine, Calibration(short, (1, 1), (), 1.0))
    dpe_search.store(engine, Calibration(long, (2, 1), (), 1.0))
    dpe_search.store(engine, Calibration(short, (1, 2), (), 1.0))
    assert len(dpe_search.calibrations(engine)) == 2
    assert dpe_search.calibrated_scales(engine, 16) == (2, 1)


def test_no_calibration_is_refused_naming_the_command():
    engine = tiny_engine()
    for attempt in (lambda: engine.new_sequence("dpe(scales=calibrated)"),
                    lambda: engine.context_window(kvlab.parse_recipe("dpe(scales=calibrated)"))):
        with pytest.raises(kvlab.RecipeError, match="no DPE calibration .* run 'kvlab calibrate dpe --window 1024'"):
            attempt()
    dpe_search.store(engine, Calibration(small_search(engine), (1, 2), (), 1.0))
    with pytest.raises(kvlab.RecipeError, match="it has calibrations for window 16"):
        engine.new_sequence("dpe(scales=calibrated, window=32)")
    with pytest.raises(kvlab.RecipeError, match="when the recipe runs on an engine"):
        DPE(scales="calibrated").pair_scales(8)


def test_a_calibration_of_another_model_is_refused():
    first, second = tiny_engine(seed=0), tiny_engine(seed=1)  # one configuration, other weights
    dpe_search.store(first, Calibration(small_search(first), (1, 2), (), 1.0))
    with pytest.raises(kvlab.RecipeError, match="no DPE calibration"):
        second.new_sequence("dpe(scales=calibrated, window=16)")
    target = dpe_search.calibration_path(second)  # the file copied under the other model's name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(dpe_search.calibration_path(first), target)
    with pytest.raises(kvlab.RecipeError, match="is not a DPE calibration of"):
        second.new_sequence("dpe(scales=calibrated, window=16)")


def test_a_progress_bar_counts_every_probe(monkeypatch):
    events = []

    class Bar:
        def __init__(self, show, unit):
            events.append(("open", show, unit))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def add_task(self, description, total):
            events.append(("task", description, total))
            return 0

        def advance(self, task):
            events.append(("advance",))

    monkeypatch.setattr(dpe_search, "progress_bar", Bar)
    engine = tiny_engine()
    engine.progress = True
    dpe_search.calibrate(engine, small_search(engine, probes=2, length=80))
    assert events[0] == ("open", True, "probes")
    assert events[1][0] == "task" and events[1][2] == 2 * 2 * 2 and "dpe: calibrating 2 group scales" in events[1][1]
    assert events.count(("advance",)) == 8  # groups x candidates x probes


def test_bad_scales_words_are_refused():
    with pytest.raises(kvlab.RecipeError, match="or calibrated"):
        kvlab.parse_recipe("dpe(scales=calibrate)")


def test_the_command_calibrates_and_the_recipe_reads_it(model_dir):
    from typer.testing import CliRunner

    from kvlab.cli import app

    result = CliRunner().invoke(app, [
        "calibrate", "dpe", "--model", str(model_dir), "--length", "200", "--window", "32",
        "--groups", "2", "--probes", "1", "--probe-set", "words", "--candidates", "1,4", "--json",
    ])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert len(payload["scales"]) == 2 and len(payload["table"]) == 4
    assert payload["recipe"] == "dpe(scales=calibrated, window=32)"
    engine = kvlab.load(str(model_dir), progress=False)
    assert dpe_search.calibrated_scales(engine, 32) == tuple(payload["scales"])
    text = CliRunner().invoke(app, [
        "calibrate", "dpe", "--model", str(model_dir), "--length", "200", "--window", "32",
        "--groups", "2", "--probes", "1", "--probe-set", "words", "--candidates", "2",
    ])
    assert text.exit_code == 0, text.output
    assert "needle accuracy" in text.stdout and "scales [2, 2]" in text.stdout and " s; written to " in text.stdout
    bad = CliRunner().invoke(app, ["calibrate", "dpe", "--model", str(model_dir), "--candidates", "1,x"])
    assert bad.exit_code == 2 and "'x' is not an integer" in bad.output

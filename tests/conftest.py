"""Shared fixtures: tiny random-weight models (fast, deterministic) and the real tokenizer."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import kvlab
from kvlab.engine.loading import converted_gguf, default_gguf

TINY = dict(
    vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
)
ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 16}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
}


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """A random-weight model of ``arch``, float32, in eval mode."""
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **extra, **overrides})
    return model_cls(config).eval()


def tiny_engine(arch: str = "llama", seed: int = 0, tokenizer=None, **overrides) -> kvlab.Engine:
    return kvlab.Engine(tiny_model(arch, seed, **overrides), tokenizer, progress=False)


def prefilled(engine, recipe, ids):
    """A sequence of ``recipe`` with ``ids`` prefilled as its context (compressed at the end)."""
    sequence = engine.new_sequence(recipe)
    engine.prefill(sequence, ids, compress=True)
    return sequence


def teacher_logprobs(engine, recipe, ids, follow):
    """Prefill ``ids`` with ``recipe`` (compressed at the end); the prompt's last logits and the
    log-probabilities of ``follow`` teacher-forced through that cache."""
    cache = engine.new_sequence(recipe)
    logits = engine.prefill(cache, ids, compress=True)
    return logits, engine.teacher_force(cache, logits, follow)


def assert_recipe_refused(text: str, fragment: str) -> None:
    """Parsing the recipe ``text`` raises :class:`kvlab.RecipeError` whose message holds
    ``fragment`` (the bad value, or the allowed ones)."""
    from kvlab.recipe import parse_recipe

    with pytest.raises(kvlab.RecipeError) as info:
        parse_recipe(text)
    assert fragment in str(info.value)


def prompt_ids(n: int, seed: int = 1, vocab: int = 256) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


@pytest.fixture(scope="session")
def tokenizer():
    """SmolLM2's tokenizer, from the default model package (converted once, offline)."""
    return AutoTokenizer.from_pretrained(converted_gguf(default_gguf()))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """A tiny random model saved as a transformers directory, with the real tokenizer
    (2,048-token window): what ``--model DIR`` loads in the CLI tests."""
    path = tmp_path_factory.mktemp("tiny-model")
    tiny_model(vocab_size=len(tokenizer), max_position_embeddings=2048).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def default_engine():
    """The real embedded default model (SmolLM2-135M-Instruct)."""
    return kvlab.load(progress=False)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors: a second torch thread only waits for the first (on a busy 2-core machine
    it made a module several times slower). A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

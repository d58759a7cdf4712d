"""Loading: the converted-model cache's key, quiet conversion, never downloading.

Corrupt model files (each row of CLI_MODELS / API_MODELS) are in tests/test_bad_input.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import tqdm.std
from gguf import GGUFWriter
from huggingface_hub.utils import are_progress_bars_disabled
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import kvlab
from kvlab.engine import loading
from kvlab.engine.loading import converted_gguf, converted_path, quiet_loading
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[2]


def _byte_tokens() -> list[str]:
    """GPT-2's byte-level alphabet: the 256 one-byte tokens, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


_GGUF_PARTS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def write_tiny_gguf(path: Path, seed: int = 0) -> Path:
    """A tiny random llama as a float32 GGUF file, with a 258-token byte-level BPE tokenizer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    model = tiny_model(seed=seed, vocab_size=258)
    config = model.config
    writer = GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([*_byte_tokens(), "Ġt", "he"])
    writer.add_token_types([1] * 258)
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    top = {"model.embed_tokens.weight": "token_embd.weight", "lm_head.weight": "output.weight",
           "model.norm.weight": "output_norm.weight"}
    for name, tensor in model.state_dict().items():
        if name in top:
            gguf_name = top[name]
        else:
            _, _, layer, *rest = name.split(".")
            gguf_name = f"blk.{layer}.{_GGUF_PARTS['.'.join(rest[:-1])]}.weight"
        writer.add_tensor(gguf_name, tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv("KVLAB_CACHE_DIR", str(directory))
    return directory


# -- the cache key ----------------------------------------------------------------------------

def _file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(
    "full_hash_limit", [loading.FULL_HASH_LIMIT, 2**20], ids=["whole", "sampled"]
)
def test_identical_files_share_one_cache_entry_and_different_ones_do_not(
    tmp_path, cache, monkeypatch, full_hash_limit
):
    monkeypatch.setattr(loading, "FULL_HASH_LIMIT", full_hash_limit)
    data = np.random.default_rng(0).bytes(3 * 2**20)
    first = _file(tmp_path / "venv-a" / "model.gguf", data)
    second = _file(tmp_path / "elsewhere" / "renamed.gguf", data)
    os.utime(second, (0, 0))  # another mtime: only the bytes count
    link = tmp_path / "link.gguf"
    link.symlink_to(first)
    assert converted_path(first) == converted_path(second) == converted_path(link)
    assert converted_path(first).parent == cache / "models"
    changed = bytearray(data)
    changed[-1] ^= 1  # the last byte: inside the last block of the sampled hash too
    assert converted_path(_file(tmp_path / "changed.gguf", bytes(changed))) != converted_path(first)
    assert converted_path(_file(tmp_path / "longer.gguf", data + b"\0")) != converted_path(first)


def test_the_cache_key_follows_the_converter_version(tmp_path, cache, monkeypatch):
    path = _file(tmp_path / "model.gguf", b"GGUF" + bytes(100))
    before = converted_path(path)
    monkeypatch.setattr(loading, "CONVERTER_VERSION", loading.CONVERTER_VERSION + 1)
    assert converted_path(path) != before
    assert "transformers" in loading.converter_version() and "gguf" in loading.converter_version()


def test_the_cache_key_does_not_depend_on_the_virtualenv(tmp_path, cache, monkeypatch):
    path = _file(tmp_path / "model.gguf", b"GGUF" + bytes(100))
    before = converted_path(path)
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "another-venv"))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "another-venv" / "bin" / "python"))
    assert converted_path(path) == before


# -- conversion -------------------------------------------------------------------------------

def test_a_conversion_prints_only_kvlab_s_line_and_is_shared_by_identical_files(
    tmp_path, cache, capfd
):
    gguf = write_tiny_gguf(tmp_path / "a" / "tiny.gguf")
    target = converted_gguf(gguf, progress=True)
    out, err = capfd.readouterr()
    assert out == ""
    assert err.splitlines() == [f"kvlab: converting tiny.gguf (0 MiB) once, into {target}"]
    assert (target / "config.json").is_file() and (target / "model.safetensors").is_file()
    assert target.parent == cache / "models"
    assert [p.name for p in target.parent.iterdir()] == [target.name]  # no staging left behind

    copy = tmp_path / "b" / "copy.gguf"
    copy.parent.mkdir()
    copy.write_bytes(gguf.read_bytes())
    assert converted_gguf(copy, progress=True) == target  # not converted again
    engine = kvlab.load(copy, progress=False)
    assert engine.name == "copy"
    out, err = capfd.readouterr()
    assert out == "" and err == ""

    other = write_tiny_gguf(tmp_path / "b" / "other.gguf", seed=1)
    assert converted_gguf(other, progress=False) != target
    assert capfd.readouterr() == ("", "")


def test_quiet_loading_silences_tqdm_and_restores_everything(capfd):
    hf_logging.enable_progress_bar()
    hf_logging.set_verbosity_warning()  # as a user may have it
    init = tqdm.std.tqdm.__dict__["__init__"]
    with quiet_loading():
        assert are_progress_bars_disabled()  # huggingface_hub's own bars
        for _ in tqdm.std.tqdm(range(3), desc="third-party bar"):
            pass
        for _ in hf_logging.tqdm(range(3), desc="transformers bar"):
            pass
        assert hf_logging.get_verbosity() == hf_logging.ERROR  # no warnings or info lines
    assert capfd.readouterr().err == ""
    assert tqdm.std.tqdm.__dict__["__init__"] is init
    assert hf_logging.get_verbosity() == hf_logging.WARNING
    assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    hf_logging.set_verbosity_error()  # kvlab's default (TRANSFORMERS_VERBOSITY=error)
    for _ in tqdm.std.tqdm(range(3), desc="after"):
        pass
    assert "after" in capfd.readouterr().err  # bars work again outside


def test_every_from_pretrained_call_is_local_files_only(tmp_path, cache, monkeypatch, model_dir):
    calls = []

    def recording(cls_method):
        def call(*args, **kwargs):
            calls.append(kwargs.get("local_files_only"))
            return cls_method(*args, **kwargs)
        return call

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", recording(AutoTokenizer.from_pretrained))
    monkeypatch.setattr(
        AutoModelForCausalLM, "from_pretrained", recording(AutoModelForCausalLM.from_pretrained)
    )
    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    kvlab.load(gguf, progress=False)  # converts (2 calls) then loads the converted copy (2 calls)
    kvlab.load(model_dir, progress=False)
    assert calls == [True] * 6


@pytest.fixture()
def model_dir(tmp_path, tokenizer):
    path = tmp_path / "tiny-model"
    tiny_model(vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_kvlab_stays_offline_whatever_the_environment_says(tmp_path):
    """HF_HUB_OFFLINE=0 does not let kvlab reach the network: offline is forced, and nothing
    connects while it refuses a config-only directory and a Hub repository id."""
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text(tiny_model().config.to_json_string())
    script = textwrap.dedent(
        """
        import socket, sys
        def refuse(*args, **kwargs):
            print("NETWORK ATTEMPT", args, flush=True)
            raise OSError("no network in this test")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        import kvlab
        import huggingface_hub.constants
        print("offline", huggingface_hub.constants.HF_HUB_OFFLINE)
        for model in sys.argv[1:]:
            try:
                kvlab.load(model, progress=False)
            except kvlab.ModelError as exc:
                print("ModelError", exc)
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "config-only"), "HuggingFaceTB/SmolLM2-135M"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "offline True"
    assert "NETWORK ATTEMPT" not in result.stdout
    assert lines[1].startswith("ModelError model directory") and "no weights" in lines[1]
    assert lines[2].startswith("ModelError model 'HuggingFaceTB/SmolLM2-135M' not found")
    assert "never downloads" in lines[2]
    assert len(lines) == 3

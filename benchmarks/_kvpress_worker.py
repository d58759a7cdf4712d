"""The kvpress side of ``benchmarks/vs_kvpress.py``; runs in ``benchmarks/.kvpress-venv``.

kvpress pins ``transformers<5.3`` and kvlab needs a newer one, so this file runs in its own
virtual environment and imports nothing from kvlab. It reads a JSON job (model directory,
settings, cases, methods), runs every case through kvpress's ``kv-press-text-generation``
pipeline once per method, and writes a JSON file of results: answers, generated token ids,
wall time per (case, method), and the bytes of the ``DynamicCache`` the pipeline leaves behind
(the compressed context: the pipeline removes each question's tokens after answering it).

Two ways to run it:

- ``python _kvpress_worker.py JOB.json RESULT.json``: one job, then exit.
- ``python _kvpress_worker.py --serve SETTINGS.json``: load the model once, print ``READY``,
  then for each stdin line ``JOB.json RESULT.json`` run that job and print ``DONE``
  (``vs_kvpress.py`` uses this to interleave the two libraries case by case, so both see the
  same load on a shared machine).

Progress goes to stdout as lines ``PROGRESS <json>``; logging goes to stderr.

A job: ``{"cases": [{"id", "context", "turns": [{"question", "answer_prefix",
"max_new_tokens"}]}], "methods": [{"key", "press", "eager_prefill"}], "warmup": bool}``.
``press`` is null (no compression) or a press tree ``{"class": "SnapKVPress", "kwargs":
{...}}``; a kwarg that is itself such a tree (or a list of them) is built first, so
``AdaKVPress(press=SnapKVPress(...))`` and ``ComposedPress(presses=[...])`` are expressible.
``eager_prefill: true`` runs the context's prefill with ``attn_implementation="eager"`` (the
only implementation that returns attention weights, which ``ObservedAttentionPress`` needs) and
switches back to the model's own implementation for the questions. In one-shot mode the job
also carries the settings: ``model_path``, ``threads``, ``max_context_length``,
``question_prefix`` and optionally ``calibration_texts`` (see :func:`offline_duo_calibration`).

Measured per (case, method), besides answers and times: ``cache_bytes`` / ``cache_tokens``,
what the ``DynamicCache`` tensors physically hold after the call; and, for presses that only
mask entries (AdaKV, DuoAttention: fake keys at attention time) or zero key channels (ThinK)
without shrinking the tensors, ``effective_bytes`` / ``effective_tokens``: what a cache that
dropped the masked entries and the all-zero key channels would hold. For other presses the two
pairs are equal.

One fix to the model's execution, needed for PyramidKVPress on CPU: see
:func:`per_layer_causal_mask` (counted per run as ``mask_fixes``).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def emit(event: str, **data: Any) -> None:
    print("PROGRESS " + json.dumps({"event": event, **data}), flush=True)


def cache_measure(cache: Any, masks: list[Any] | None = None) -> dict[str, Any]:
    """What a DynamicCache holds: ``bytes`` of every key/value tensor and ``tokens``, the mean
    entries per layer and KV head (physical); ``effective_bytes`` / ``effective_tokens`` count
    only entries not masked (``masks[layer]``: kvpress's ``masked_key_indices``, a tuple of
    batch, head and position indices, or None) and key channels not zeroed in a whole head;
    ``masked_entries`` and ``zero_key_channels`` say how many were left out."""
    total = effective = masked_total = zero_total = 0
    entries: list[float] = []
    effective_entries: list[float] = []
    for i, layer in enumerate(cache.layers):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        for t in (keys, values):
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
        if keys is None or not hasattr(keys, "dim") or keys.dim() != 4:
            continue
        b, h, n, d = keys.shape
        dv = values.shape[-1]
        entries.append(n)
        kept = keys.new_full((b, h), n, dtype=keys.dtype).long()  # unmasked entries per head
        mask = masks[i] if masks and i < len(masks) else None
        if mask is not None and len(mask[0]):
            bi, hi = mask[0].to(keys.device).long(), mask[1].to(keys.device).long()
            kept -= (bi * h + hi).bincount(minlength=b * h).view(b, h)
            masked_total += int(len(mask[0]))
        zero = (keys == 0).all(dim=2).sum(dim=-1) if n else kept * 0  # [b, h] zeroed channels
        zero_total += int(zero.sum())
        effective += int((kept * (d - zero + dv)).sum()) * keys.element_size()
        effective_entries.append(float(kept.float().mean()))
    return {
        "bytes": total,
        "tokens": sum(entries) / len(entries) if entries else 0.0,
        "effective_bytes": effective,
        "effective_tokens": sum(effective_entries) / len(effective_entries) if effective_entries else 0.0,
        "masked_entries": masked_total,
        "zero_key_channels": zero_total,
    }


def offline_duo_calibration(texts: list[str]) -> None:
    """Let ``DuoAttentionPress(on_the_fly_scoring=True)`` run offline.

    kvpress's on-the-fly head scoring (``duo_attention_on_the_fly``) averages queries and keys
    over 50 chapters sampled from the ``kmfoda/booksum`` dataset, downloaded with
    ``datasets.load_dataset``; this machine has no network. The scoring code itself is kept;
    only its data source is replaced by ``texts`` (book prose from kvlab's shipped corpus,
    given by ``vs_kvpress.py``), served in the shape it expects: a frame with a ``chapter``
    column from which it samples 50 rows."""
    import pandas as pd

    from kvpress.presses import duo_attention_press

    class _Local:
        def to_pandas(self) -> Any:
            return pd.DataFrame({"chapter": list(texts)})

    def load_dataset(name: str, *args: Any, **kwargs: Any) -> Any:
        return _Local()

    duo_attention_press.load_dataset = load_dataset


MASK_FIXES = [0]  # questions whose causal mask was rebuilt for a shorter layer (see below)


def per_layer_causal_mask() -> None:
    """Let presses that leave layers of different lengths (PyramidKVPress) answer on CPU.

    transformers sizes a forward's causal mask once, from layer 0's cache length. After a
    PyramidKV prefill, layers hold different numbers of entries, so a question of several
    tokens fails in every shorter layer with sdpa ("The size of tensor a (530) must match the
    size of tensor b (546)"), and with eager attention the mask is silently cut to the layer's
    length, which lets question tokens see later question tokens. On GPU kvpress is run with
    flash attention, which takes no mask: each layer's queries are aligned to the end of its
    own keys. This wrapper of the (kvpress-patched) sdpa function does the same where the mask
    does not fit the layer: query ``i`` of ``q`` sees key ``j`` of ``k`` iff
    ``j <= k - q + i``. Layers whose mask fits (every other press) are untouched; the number of
    rebuilt masks is reported as ``mask_fixes``."""
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    inner = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def sdpa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, *args: Any,
             **kwargs: Any) -> Any:
        if attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
            q, k = query.shape[-2], key.shape[-2]
            causal = torch.ones(q, k, dtype=torch.bool, device=query.device).tril(k - q)[None, None]
            if attention_mask.dtype == torch.bool:
                attention_mask = causal
            else:
                attention_mask = torch.zeros(causal.shape, dtype=attention_mask.dtype, device=query.device)
                attention_mask.masked_fill_(~causal, torch.finfo(attention_mask.dtype).min)
            MASK_FIXES[0] += 1
        return inner(module, query, key, value, attention_mask, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = sdpa


class EagerPrefill:
    """A press used as kvpress's pipeline uses one (``with press(model):`` around the context's
    prefill only) that switches the model to eager attention for that prefill, so the
    attention layers return their weights, and back afterwards (questions and decoding run on
    the model's own implementation, like every other method)."""

    def __init__(self, press: Any) -> None:
        self.press = press

    def __getattr__(self, name: str) -> Any:
        return getattr(self.press, name)

    def __call__(self, model: Any) -> Any:
        import contextlib

        @contextlib.contextmanager
        def scope() -> Any:
            before = model.config._attn_implementation
            model.set_attn_implementation("eager")
            try:
                with self.press(model):
                    yield
            finally:
                model.set_attn_implementation(before)

        return scope()


class RecordingDecode:
    """Wraps ``tokenizer.decode`` to remember the ids the pipeline decodes (its answers);
    kvpress's pipeline returns only text, and the benchmark compares token ids."""

    def __init__(self, decode: Any) -> None:
        self.decode = decode
        self.calls: list[list[int]] = []

    def __call__(self, ids: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            self.calls.append([int(i) for i in ids])
        except TypeError:
            pass
        return self.decode(ids, *args, **kwargs)


class Runner:
    """kvpress's pipeline on one loaded model."""

    def __init__(self, settings: dict[str, Any]) -> None:
        import torch

        torch.set_num_threads(int(settings["threads"]))
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
        from transformers.utils import logging as hf_logging

        import kvpress  # registers the "kv-press-text-generation" pipeline

        per_layer_causal_mask()

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        from importlib.metadata import version

        self.torch, self.kvpress = torch, kvpress
        start = time.perf_counter()
        path = settings["model_path"]
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch.float32, local_files_only=True
        ).eval()
        self.model = model
        if settings.get("calibration_texts"):
            offline_duo_calibration(settings["calibration_texts"])
        self.pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
        self.context_tokens: list[int] = []
        preprocess = self.pipe.preprocess

        def counting_preprocess(*args: Any, **kwargs: Any) -> Any:
            out = preprocess(*args, **kwargs)
            self.context_tokens.append(int(out["context_ids"].shape[1]))
            return out

        self.pipe.preprocess = counting_preprocess
        self.recorder = RecordingDecode(self.pipe.tokenizer.decode)
        self.pipe.tokenizer.decode = self.recorder
        self.answer_s: list[float] = []
        generate_answer = self.pipe.generate_answer

        def timed_generate_answer(*args: Any, **kwargs: Any) -> Any:
            # question prefill + greedy decoding of one answer; the rest of a pipeline call is
            # tokenization and the context's prefill + compression
            start = time.perf_counter()
            try:
                return generate_answer(*args, **kwargs)
            finally:
                self.answer_s.append(time.perf_counter() - start)

        self.pipe.generate_answer = timed_generate_answer
        self.load_s = time.perf_counter() - start
        self.max_context_length = int(settings["max_context_length"])
        self.question_prefix = settings.get("question_prefix", "")
        self.env = {
            "kvpress": version("kvpress"),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "threads": torch.get_num_threads(),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "eos_token_id": model.generation_config.eos_token_id,
        }

    def build(self, tree: Any) -> Any:
        """A press from its tree ``{"class", "kwargs"}``; nested trees are built first."""
        if isinstance(tree, list):
            return [self.build(t) for t in tree]
        if isinstance(tree, dict) and "class" in tree:
            cls = getattr(self.kvpress, tree["class"])
            return cls(**{k: self.build(v) for k, v in tree.get("kwargs", {}).items()})
        return tree

    def press(self, method: dict[str, Any]) -> Any:
        if method.get("press") is None:
            return None
        press = self.build(method["press"])
        return EagerPrefill(press) if method.get("eager_prefill") else press

    def masks(self) -> list[Any]:
        """Each layer's ``masked_key_indices`` (set by AdaKV / DuoAttention, None otherwise;
        kvpress resets it at every prefill)."""
        return [getattr(layer.self_attn, "masked_key_indices", None) for layer in self.model.model.layers]

    @staticmethod
    def describe(press: Any) -> dict[str, Any]:
        """What the press decided that the results do not show (DuoAttention's heads)."""
        mask = getattr(press, "streaming_mask", None)
        if mask is None:
            return {}
        return {"streaming_heads": [[int(x) for x in row] for row in mask.int().tolist()],
                "sink_size": press.sink_size, "recent_size": press.recent_size}

    def run(self, case: dict[str, Any], method: dict[str, Any]) -> dict[str, Any]:
        from transformers import DynamicCache

        press = self.press(method)
        inner = press.press if isinstance(press, EagerPrefill) else press
        # kvpress clears masked_key_indices in its patched attention functions at each prefill,
        # but an eager prefill does not go through them: clear stale masks of an earlier
        # AdaKV/DuoAttention run so they cannot leak into this method's questions
        for layer in self.model.model.layers:
            layer.self_attn.masked_key_indices = None
        turns = case["turns"]
        answers: list[str | None] = [None] * len(turns)
        token_ids: list[list[int] | None] = [None] * len(turns)
        # One pipeline call per group of turns sharing answer_prefix and max_new_tokens: the
        # context is prefilled and compressed once per call, and each question is answered
        # against that cache (its tokens are removed afterwards), like a kvlab multi-request
        # session. kvlab's tasks give every turn of a case the same prefix: one call per case.
        groups: dict[tuple[str, int], list[int]] = {}
        for i, t in enumerate(turns):
            groups.setdefault((t["answer_prefix"], int(t["max_new_tokens"])), []).append(i)
        measured: dict[str, Any] = {}
        calls, fixes = 0, MASK_FIXES[0]
        self.answer_s.clear()
        self.context_tokens.clear()
        start = time.perf_counter()
        with self.torch.inference_mode():
            for (prefix, max_new), idx in groups.items():
                cache = DynamicCache()
                self.recorder.calls.clear()
                out = self.pipe(
                    case["context"],
                    questions=[self.question_prefix + turns[i]["question"] for i in idx],
                    answer_prefix=prefix,
                    press=press,
                    max_new_tokens=max_new,
                    max_context_length=self.max_context_length,
                    cache=cache,
                )
                calls += 1
                for j, i in enumerate(idx):
                    answers[i] = out["answers"][j]
                    if j < len(self.recorder.calls):
                        token_ids[i] = self.recorder.calls[j]
                m = cache_measure(cache, self.masks() if press is not None else None)
                if not measured or m["bytes"] > measured["bytes"]:
                    measured = m
        wall_s = time.perf_counter() - start
        return {
            "case_id": case["id"],
            "method": method["key"],
            "answers": answers,
            "token_ids": token_ids,
            "wall_s": wall_s,
            "answers_s": sum(self.answer_s),
            "context_s": wall_s - sum(self.answer_s),
            "context_tokens": max(self.context_tokens, default=0),
            "cache_bytes": measured.get("bytes", 0),
            "cache_tokens": measured.get("tokens", 0.0),
            "effective_bytes": measured.get("effective_bytes", 0),
            "effective_tokens": measured.get("effective_tokens", 0.0),
            "masked_entries": measured.get("masked_entries", 0),
            "zero_key_channels": measured.get("zero_key_channels", 0),
            "press_repr": repr(inner) if inner is not None else None,
            "press_info": self.describe(inner) if inner is not None else {},
            "pipeline_calls": calls,
            "mask_fixes": MASK_FIXES[0] - fixes,
        }

    def job(self, job: dict[str, Any]) -> dict[str, Any]:
        if job.get("warmup") and job["cases"]:
            emit("stage", label="kvpress warm-up")
            first = job["cases"][0]
            warm = {**first, "turns": first["turns"][:1]}
            for method in job["methods"]:
                self.run(warm, method)
        results = []
        for case in job["cases"]:
            for method in job["methods"]:
                results.append(self.run(case, method))
                emit("advance", label=f"kvpress {case['id']} {method['key']}")
        return {"env": self.env, "load_s": self.load_s, "results": results}


def read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def write_json(path: str, payload: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f)


def serve(settings_path: str) -> None:
    emit("stage", label="loading the model in kvpress's environment")
    runner = Runner(read_json(settings_path))
    print("READY " + json.dumps({"env": runner.env, "load_s": runner.load_s}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        job_path, out_path = line.split()
        write_json(out_path, runner.job(read_json(job_path)))
        print("DONE " + out_path, flush=True)


def once(job_path: str, out_path: str) -> None:
    job = read_json(job_path)
    emit("stage", label="loading the model in kvpress's environment")
    write_json(out_path, Runner(job).job(job))


if __name__ == "__main__":
    try:
        if len(sys.argv) == 3 and sys.argv[1] == "--serve":
            serve(sys.argv[2])
        elif len(sys.argv) == 3:
            once(sys.argv[1], sys.argv[2])
        else:
            sys.exit("usage: _kvpress_worker.py JOB.json RESULT.json | --serve SETTINGS.json")
    except Exception:
        traceback.print_exc()
        sys.exit(1)

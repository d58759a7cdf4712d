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
"max_new_tokens"}]}], "methods": [{"key", "press" (class name or null),
"compression_ratio", "kwargs"}], "warmup": bool}``; in one-shot mode it also carries the
settings: ``model_path``, ``threads``, ``max_context_length``, ``question_prefix``.
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


def cache_measure(cache: Any) -> tuple[int, float]:
    """(bytes of every key/value tensor, mean entries per layer and KV head) of a DynamicCache."""
    total, entries = 0, []
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None and hasattr(t, "numel"):
                total += t.numel() * t.element_size()
        keys = getattr(layer, "keys", None)
        if keys is not None and hasattr(keys, "dim") and keys.dim() == 4:
            entries.append(keys.shape[-2])
    return total, (sum(entries) / len(entries) if entries else 0.0)


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
        self.pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tokenizer, device="cpu")
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

    def press(self, method: dict[str, Any]) -> Any:
        if method.get("press") is None:
            return None
        cls = getattr(self.kvpress, method["press"])
        return cls(compression_ratio=method["compression_ratio"], **method.get("kwargs", {}))

    def run(self, case: dict[str, Any], method: dict[str, Any]) -> dict[str, Any]:
        from transformers import DynamicCache

        press = self.press(method)
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
        cache_bytes, cache_tokens, calls = 0, 0.0, 0
        self.answer_s.clear()
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
                b, n = cache_measure(cache)
                cache_bytes, cache_tokens = max(cache_bytes, b), max(cache_tokens, n)
        wall_s = time.perf_counter() - start
        return {
            "case_id": case["id"],
            "method": method["key"],
            "answers": answers,
            "token_ids": token_ids,
            "wall_s": wall_s,
            "answers_s": sum(self.answer_s),
            "context_s": wall_s - sum(self.answer_s),
            "cache_bytes": cache_bytes,
            "cache_tokens": cache_tokens,
            "pipeline_calls": calls,
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

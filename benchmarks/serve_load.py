#!/usr/bin/env python
"""``kvlab serve`` under load: real server subprocesses on loopback, many clients at once.

A shared document (``--doc-tokens``, default 4k tokens of the shipped prose corpus) is the
system prompt of every request; each request asks its own question (a chat request with
``stream: true``, greedy, ``max_tokens`` small so the run stays bounded), so after the first
request every one reuses the stored context and prefills only its question. Measured:

1. **Time to first token with and without reuse** on an ``--ttft-tokens`` (default 8k) context:
   a cold request (the context is encoded) against questions on the already-encoded context
   (their median); the issue's target is a ratio >= 50.
2. **Throughput with 1, 4 and 16 concurrent clients**, batched (``--max-batch 16``: the decoding
   steps of concurrent requests in one forward) and not (``--max-batch 1``: one request at a
   time), each client sending ``--throughput-requests`` requests one after the other:
   completion tokens per second of wall time, and latency percentiles.
3. **Load**: ``--clients`` (64) clients x ``--requests`` (10) requests each on the batched
   server: errors (anything but a complete answer: a non-200 status, an error event, a
   missing ``[DONE]``), p50/p99 latency and time to first token, tokens per second.

The batched server's resident memory (RSS of its process, psutil) is sampled every 0.5 s
across the whole run; reported per phase and in tenths of the load phase (flat = no leak).
Each phase also notes the machine's 1-minute load average. Results go to a JSON file and a
Markdown table (``--out``, default ``benchmarks/results/serve_load.{json,md}``).

    nohup python benchmarks/serve_load.py > serve_load.log 2>&1 &
    python benchmarks/serve_load.py --clients 8 --requests 2 --throughput-clients 1,4 --ttft-tokens 2k  # quick
    python benchmarks/serve_load.py --decode-steps   # batched decoding steps vs one by one, no HTTP
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import median

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvlab.bench.lengths import parse_length  # noqa: E402
from kvlab.corpus import prose_units  # noqa: E402

QUESTIONS = (
    "Who is mentioned first in the document?", "What happens at the end of the document?",
    "Which places does the document name?", "What is the mood of the second paragraph?",
    "Summarise the document in one sentence.", "Which person speaks most often?",
    "What time of day is it in the document?", "Name one object the document describes.",
)


@dataclass
class Result:
    """One request as a client saw it: wall seconds to the first content chunk and to the end."""

    ok: bool
    ttft_s: float
    latency_s: float
    completion_tokens: int
    cached_tokens: int
    error: str = ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``kvlab serve`` in a subprocess (the default model), stopped with SIGTERM."""

    def __init__(self, max_batch: int, log: Path, threads: int) -> None:
        self.port = free_port()
        self.log = open(log, "w")
        command = [sys.executable, "-c", "from kvlab.cli import main; main()", "serve", "--port", str(self.port),
                   "--max-batch", str(max_batch), "--max-queue", "256", "--max-cache-gib", "8"]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.max_batch = max_batch
        try:
            self._wait_ready(log)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, log: Path) -> None:
        deadline = time.monotonic() + 600
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}; see {log}")
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not start within 600 s")
            time.sleep(0.5)
        conn.request("GET", "/v1/models")
        self.model = json.loads(conn.getresponse().read())["data"][0]["id"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)
        self.log.close()


class RssSampler:
    """The resident memory of one process, sampled every ``interval`` seconds in a thread."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        self.process = psutil.Process(pid)
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic(), self.process.memory_info().rss))
            except psutil.Error:
                return
            self._stop.wait(0.5)

    def between(self, start: float, end: float) -> list[int]:
        return [rss for t, rss in self.samples if start <= t <= end]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def ask(server: Server, document: str, question: str, max_tokens: int, timeout: float = 1800.0) -> Result:
    """One streamed chat request; times measured on this side of the socket."""
    body = json.dumps({
        "model": server.model, "temperature": 0, "max_tokens": max_tokens, "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "system", "content": document}, {"role": "user", "content": question}],
    })
    start = time.perf_counter()
    first, usage, done = None, None, False
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=timeout)
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        if response.status != 200:
            return Result(False, 0.0, time.perf_counter() - start, 0, 0, f"HTTP {response.status}: {response.read()[:200]!r}")
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return Result(False, 0.0, time.perf_counter() - start, 0, 0, chunk["error"]["message"][:200])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter()
        conn.close()
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
        return Result(False, 0.0, time.perf_counter() - start, 0, 0, f"{type(exc).__name__}: {exc}")
    end = time.perf_counter()
    if not done or usage is None:
        return Result(False, 0.0, end - start, 0, 0, "the stream ended without usage and [DONE]")
    return Result(True, (first or end) - start, end - start, usage["completion_tokens"],
                  usage["prompt_tokens_details"]["cached_tokens"])


def clients_run(server: Server, document: str, clients: int, requests: int, max_tokens: int) -> tuple[list[Result], float]:
    """``clients`` threads, each sending ``requests`` requests one after the other."""
    def client(c: int) -> list[Result]:
        return [ask(server, document, f"Question {c}.{r}: {QUESTIONS[(c + r) % len(QUESTIONS)]}", max_tokens)
                for r in range(requests)]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in 0..100) of ``values``."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))] if ordered else float("nan")


def summary(results: list[Result], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    return {
        "requests": len(results), "errors": len(results) - len(ok),
        "error_examples": sorted({r.error for r in results if not r.ok})[:3],
        "wall_s": round(wall, 2), "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
        "latency_p50_s": round(percentile([r.latency_s for r in ok], 50), 3),
        "latency_p99_s": round(percentile([r.latency_s for r in ok], 99), 3),
        "ttft_p50_s": round(percentile([r.ttft_s for r in ok], 50), 3),
        "ttft_p99_s": round(percentile([r.ttft_s for r in ok], 99), 3),
        "cached_requests": sum(1 for r in ok if r.cached_tokens > 0),
    }


def document_of(tokenizer, tokens: int, start: int = 0) -> str:
    """Prose units from ``start`` on, until the text encodes to about ``tokens`` tokens."""
    units, text = prose_units(), ""
    i = start
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < tokens:
        text += "".join(units[i % len(units): i % len(units) + 20])
        i += 20
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
    return tokenizer.decode(ids)


def load_note() -> float:
    return round(os.getloadavg()[0], 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--doc-tokens", default="4k", help="tokens of the shared document (default 4k)")
    parser.add_argument("--ttft-tokens", default="8000", help="tokens of the context of the TTFT phase (default 8000: with the chat template, a question and max_tokens it fills the 8,192-token window)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=10, help="requests per client in the load phase")
    parser.add_argument("--max-tokens", type=int, default=8, help="max_tokens of every request")
    parser.add_argument("--throughput-clients", default="1,4,16")
    parser.add_argument("--throughput-requests", type=int, default=2, help="requests per client (1 client: 4x)")
    parser.add_argument("--warm-questions", type=int, default=3, help="questions on the encoded TTFT context")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of each server (OMP_NUM_THREADS; 0: torch's default). One: on a "
                             "shared, busy machine two threads waiting on each other are slower")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load"))
    parser.add_argument("--phases", default="ttft,throughput,load", help="which phases to run (default all)")
    parser.add_argument("--decode-steps", action="store_true",
                        help="only compare decoding steps in this process (no server): B requests batched vs one by one")
    parser.add_argument("--step-lengths", default="512,4k", help="context lengths of --decode-steps")
    parser.add_argument("--step-batches", default="1,4,16", help="requests per step of --decode-steps")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per setting of --decode-steps (median)")
    args = parser.parse_args()
    if args.decode_steps:
        decode_steps(args, Path(args.out))
        return

    from transformers import AutoTokenizer

    from kvlab.engine.loading import converted_gguf, default_gguf

    tokenizer = AutoTokenizer.from_pretrained(converted_gguf(default_gguf(), progress=False))
    document = document_of(tokenizer, parse_length(args.doc_tokens))
    long_document = document_of(tokenizer, parse_length(args.ttft_tokens), start=5000)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_at_start": load_note()},
        "settings": {**vars(args), "doc_tokens": len(tokenizer(document, add_special_tokens=False)["input_ids"]),
                     "ttft_tokens": len(tokenizer(long_document, add_special_tokens=False)["input_ids"])},
        "phases": {},
    }
    print(f"settings: {report['settings']}", flush=True)
    started = time.monotonic()

    def save() -> None:
        report["wall_s"] = round(time.monotonic() - started, 1)
        out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        out.with_suffix(".md").write_text(markdown(report))

    batched = Server(16, out.with_name(out.name + "_server16.log"), args.threads)
    single = None
    rss = RssSampler(batched.process.pid)
    try:
        # 1. time to first token, cold and on the already-encoded context
        phases = set(args.phases.split(","))
        t0 = time.monotonic()
        load = load_note()
        cold = ask(batched, long_document, "What is the first name mentioned?", 4) if "ttft" in phases else None
        warm = [ask(batched, long_document, f"Question {i}: {QUESTIONS[i % len(QUESTIONS)]}", 4)
                for i in range(args.warm_questions if cold else 0)]
        if cold and not cold.ok or not all(w.ok for w in warm):
            raise RuntimeError(f"TTFT requests failed: {cold.error} {[w.error for w in warm]}")
        warm_ttft = median(w.ttft_s for w in warm) if cold else None
        report["phases"]["ttft"] = {} if not cold else {
            "context_tokens": report["settings"]["ttft_tokens"], "cold_ttft_s": round(cold.ttft_s, 3),
            "warm_ttft_s": [round(w.ttft_s, 3) for w in warm], "warm_ttft_median_s": round(warm_ttft, 3),
            "speedup": round(cold.ttft_s / warm_ttft, 1), "warm_cached_tokens": [w.cached_tokens for w in warm],
            "load_avg_1min": [load, load_note()], "rss_peak_mib": _mib(max(rss.between(t0, time.monotonic()))),
        }
        if not cold:
            del report["phases"]["ttft"]
        print("ttft:", report["phases"].get("ttft"), flush=True)
        save()

        # 2. throughput with 1, 4, 16 clients, batched and one at a time (both servers up,
        # alternating, so that a change of the machine's load hits both alike)
        single = Server(1, out.with_name(out.name + "_server1.log"), args.threads) if "throughput" in phases else None
        for server in (batched, single) if single else (batched,):  # the shared document, encoded once before the timed phases
            first = ask(server, document, "What is this document about?", args.max_tokens)
            if not first.ok:
                raise RuntimeError(f"the first request on the document failed: {first.error}")
        throughput: dict = {}
        report["phases"]["throughput"] = throughput
        for c in [int(c) for c in args.throughput_clients.split(",")] if single else []:
            n = args.throughput_requests * (4 if c == 1 else 1)
            for name, server in (("batched", batched), ("one-at-a-time", single)):
                load = load_note()
                results, wall = clients_run(server, document, c, n, args.max_tokens)
                throughput[f"{name}/{c}"] = {**summary(results, wall), "clients": c, "max_batch": server.max_batch,
                                             "load_avg_1min": [load, load_note()]}
                print(f"{name} {c} clients:", throughput[f"{name}/{c}"], flush=True)
                save()
        if single:
            single.stop()
            single = None

        # 3. the load phase on the batched server
        t0 = time.monotonic()
        load = load_note()
        results, wall = clients_run(batched, document, args.clients, args.requests, args.max_tokens)
        samples = rss.between(t0, time.monotonic())
        tenths = [samples[len(samples) * i // 10: max(len(samples) * (i + 1) // 10, len(samples) * i // 10 + 1)]
                  for i in range(10)] if samples else []
        report["phases"]["load"] = {
            **summary(results, wall), "clients": args.clients, "requests_per_client": args.requests,
            "load_avg_1min": [load, load_note()],
            "rss_mib_start": _mib(samples[0]) if samples else None,
            "rss_mib_peak": _mib(max(samples)) if samples else None,
            "rss_mib_end": _mib(samples[-1]) if samples else None,
            "rss_mib_peak_by_tenth": [_mib(max(t)) for t in tenths if t],
        }
        print("load:", report["phases"]["load"], flush=True)
        save()
    finally:
        rss.stop()
        batched.stop()
        if single is not None:
            single.stop()
    report["rss_mib_peak_whole_run_batched_server"] = _mib(max(s for _, s in rss.samples))
    report["machine"]["load_at_end"] = load_note()
    save()
    print(markdown(report))


def decode_steps(args: argparse.Namespace, out: Path) -> None:
    """In this process, without HTTP: one decoding step of B requests on one stored context
    as one batched forward (:meth:`Engine.decode_step`, what the server runs) against B
    forwards one after the other (what a server without batching runs), interleaved step by
    step so that a change of the machine's load hits both alike; median of ``--steps``."""
    import torch

    import kvlab
    from kvlab.engine.forward import Phase

    torch.set_num_threads(args.threads or torch.get_num_threads())
    engine = kvlab.load(progress=False)
    fmt = engine.prompt_format
    rows = []
    for length in [parse_length(x) for x in args.step_lengths.split(",")]:
        ids = fmt.encode(document_of(engine.tokenizer, length), first=True)
        stored = engine.new_sequence("full")
        logits = engine.prefill(stored, ids, compress=True, progress=False)
        token = int(logits.argmax())
        for batch in [int(b) for b in args.step_batches.split(",")]:
            sets = []
            for _ in range(2):  # one set of forks per variant, each with its own question
                forks = [stored.fork() for _ in range(batch)]
                for i, fork in enumerate(forks):
                    engine.prefill(fork, fmt.encode(f" Question {i}: {QUESTIONS[i % len(QUESTIONS)]}", first=False),
                                   compress=False, progress=False)
                sets.append(forks)
            together, apart = [], []
            load = load_note()
            for _ in range(args.steps):
                start = time.perf_counter()
                engine.decode_step(sets[0], [token] * batch)
                together.append(time.perf_counter() - start)
                start = time.perf_counter()
                for fork in sets[1]:
                    engine.forward(fork, [token], Phase.DECODE)
                apart.append(time.perf_counter() - start)
            kv = sets[0][0].nbytes()
            del sets
            row = {"context_tokens": len(ids), "requests": batch, "kv_mib_per_request": _mib(kv),
                   "batched_step_s": round(median(together), 3), "one_by_one_step_s": round(median(apart), 3),
                   "batched_tokens_per_s": round(batch / median(together), 2),
                   "one_by_one_tokens_per_s": round(batch / median(apart), 2),
                   "speedup": round(median(apart) / median(together), 2), "load_avg_1min": [load, load_note()]}
            rows.append(row)
            print(row, flush=True)
            out.with_name(out.name + "_steps.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = ["| context tokens | requests | KV per request (MiB) | batched step (s) | one by one (s) | batched tok/s | one by one tok/s | speedup | load avg |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['context_tokens']} | {r['requests']} | {r['kv_mib_per_request']} | {r['batched_step_s']} | "
                     f"{r['one_by_one_step_s']} | {r['batched_tokens_per_s']} | {r['one_by_one_tokens_per_s']} | "
                     f"{r['speedup']}x | {r['load_avg_1min'][0]}-{r['load_avg_1min'][1]} |")
    out.with_name(out.name + "_steps.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _mib(nbytes: int) -> float:
    return round(nbytes / 2**20, 1)


def markdown(report: dict) -> str:
    """The results as Markdown tables (what benchmarks/README.md quotes)."""
    s, phases = report["settings"], report["phases"]
    lines = [f"# kvlab serve under load ({s['doc_tokens']}-token shared document, max_tokens {s['max_tokens']}, greedy, streamed)", "",
             f"Machine: {report['machine']['cpus']} CPUs ({report['machine']['platform']}), 1-min load average "
             f"{report['machine']['load_at_start']} at the start"
             + (f", {report['machine']['load_at_end']} at the end" if "load_at_end" in report["machine"] else "")
             + f"; whole run {report.get('wall_s', '?')} s; servers with {s['threads'] or 'default'} torch thread(s).", ""]
    if "ttft" in phases:
        t = phases["ttft"]
        lines += ["## Time to first token, cold vs reused context", "",
                  "| context tokens | cold TTFT (s) | reused TTFT, median (s) | speedup | load avg |",
                  "|---:|---:|---:|---:|---|",
                  f"| {t['context_tokens']} | {t['cold_ttft_s']} | {t['warm_ttft_median_s']} | {t['speedup']}x | "
                  f"{t['load_avg_1min'][0]}-{t['load_avg_1min'][1]} |", ""]
    if phases.get("throughput"):
        lines += ["## Throughput by concurrent clients", "",
                  "| server | clients | requests | errors | tokens/s | latency p50 (s) | p99 (s) | TTFT p50 (s) | wall (s) | load avg |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for name, r in phases["throughput"].items():
            lines.append(f"| {name.split('/')[0]} | {r['clients']} | {r['requests']} | {r['errors']} | {r['tokens_per_s']} | "
                         f"{r['latency_p50_s']} | {r['latency_p99_s']} | {r['ttft_p50_s']} | {r['wall_s']} | "
                         f"{r['load_avg_1min'][0]}-{r['load_avg_1min'][1]} |")
        lines.append("")
    if "load" in phases:
        r = phases["load"]
        lines += [f"## Load: {r['clients']} clients x {r['requests_per_client']} requests (batched server, --max-batch 16)", "",
                  "| requests | errors | tokens/s | latency p50 (s) | p99 (s) | TTFT p50 (s) | p99 (s) | wall (s) | RSS start / peak / end (MiB) | load avg |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
                  f"| {r['requests']} | {r['errors']} | {r['tokens_per_s']} | {r['latency_p50_s']} | {r['latency_p99_s']} | "
                  f"{r['ttft_p50_s']} | {r['ttft_p99_s']} | {r['wall_s']} | {r['rss_mib_start']} / {r['rss_mib_peak']} / "
                  f"{r['rss_mib_end']} | {r['load_avg_1min'][0]}-{r['load_avg_1min'][1]} |", "",
                  f"Server RSS peak per tenth of the load phase (MiB): {r['rss_mib_peak_by_tenth']}", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

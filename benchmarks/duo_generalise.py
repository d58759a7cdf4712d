#!/usr/bin/env python
"""Do DuoAttention's retrieval heads generalise beyond the probes they were found on?

kvlab finds DuoAttention's retrieval heads on synthetic probes (``duo_attention(probe_set=...)``,
:mod:`kvlab.compress.duo_probes`). This script calibrates the heads of the default model
(SmolLM2-135M-Instruct) on three probe sets, ``passkey`` only, the mix of all four families,
and the mix minus the family tested, and measures question answering on three *held-out*
task families whose templates, names and values appear in no probe:

- ``digits``: 6-digit codes of a door, a safe and a locker ("... the door code is 582139 ...");
- ``words``: where three people moved, names -> cities ("Eleanor Whitby moved to Lisbon ...");
- ``multikey``: the 4-digit phone extensions of four doctors, three asked.

Each case is ~``--tokens`` tokens of the shipped prose with the needle(s) woven in at spread
depths, its three questions asked in turn in a ``multi-request`` session (the context compressed
once without the question, each answer against that cache, greedy), scored by whether the answer contains the expected value. Recipes per
case: ``full``; ``duo_attention(retrieval=R, sink=S, recent=W, probe_set=...)`` for each probe
set; and ``tova(budget=f)`` with ``f`` the bytes ratio of the mix's duo_attention on that case
(the same bytes). Writes ``benchmarks/results/duo_generalise.{json,md}``.

    python benchmarks/duo_generalise.py                    # 3 families x 4 contexts x 3 questions
    python benchmarks/duo_generalise.py --contexts 1 --families words
    python benchmarks/duo_generalise.py --report benchmarks/results/duo_generalise.json  # table only
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import kvlab  # noqa: E402
from kvlab.compress import duo_heads  # noqa: E402
from kvlab.compress.duo_probes import DEFAULT_PROBE_SET, PROBE_FAMILIES  # noqa: E402
from kvlab.corpus import haystack_units, sentence_starts, weave  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

FIRST = ("Eleanor", "Marcus", "Beatrice", "Julian", "Rosalind", "Desmond", "Harriet", "Cedric",
         "Imogen", "Leopold", "Winifred", "Ambrose", "Philippa", "Barnaby", "Cordelia", "Percival")
LAST = ("Whitby", "Ashcombe", "Fairley", "Holloway", "Pemberton", "Radcliffe", "Thornbury",
        "Blackwood", "Kingsley", "Merriweather", "Calloway", "Dunmore", "Everly", "Hargreave")
CITIES = ("Lisbon", "Vienna", "Dublin", "Oslo", "Madrid", "Prague", "Cairo", "Berlin", "Tokyo",
          "Chicago", "Boston", "Sydney", "Toronto", "Warsaw", "Athens", "Naples", "Geneva",
          "Munich", "Seattle", "Denver", "Helsinki", "Montreal", "Budapest", "Marseille")
TASKS = ("digits", "words", "multikey")
HELD_OUT = {"digits": "passkey", "words": "words", "multikey": "multikey"}  # the probe family closest


QUESTIONS = {"digits": 3, "words": 3, "multikey": 3}
"""Questions asked of each context (one prefill per recipe serves them all: multi-request)."""


def make_case(task: str, i: int, n: int, words: int) -> dict:
    """One context and its questions: (question, answer prefix, expected answer) each."""
    rng = random.Random(f"duo_generalise|{task}|{i}")
    asked = QUESTIONS[task]
    depths = [round(0.05 + 0.8 * (i * asked + j + 0.5) / (n * asked), 3) for j in range(asked)]
    rng.shuffle(depths)
    if task == "digits":
        codes = [str(x) for x in rng.sample(range(100_000, 1_000_000), 3)]
        things = ["door", "safe", "locker"]
        inserts = [(d, f"Remember this: the {t} code is {c}. The {t} code is {c}.")
                   for d, t, c in zip(depths, things, codes)]
        questions = [(f"What is the {t} code?", f"The {t} code is", c) for t, c in zip(things, codes)]
    elif task == "words":
        people = [f"{a} {b}" for a, b in zip(rng.sample(FIRST, asked), rng.sample(LAST, asked))]
        cities = rng.sample(CITIES, asked)
        inserts = [(d, f"{who} moved to {city} last spring, and {who} still lives in {city}.")
                   for d, who, city in zip(depths, people, cities)]
        questions = [(f"Which city did {who} move to?", f"{who} moved to", city) for who, city in zip(people, cities)]
    else:
        names = rng.sample(LAST, 4)
        exts = [str(x) for x in rng.sample(range(1000, 10_000), 4)]
        places = depths + [round(rng.uniform(0.05, 0.85), 3)]  # the fourth doctor is never asked
        inserts = [(d, f"The phone extension of Dr. {a} is {b}.") for d, a, b in zip(places, names, exts)]
        questions = [(f"What is the phone extension of Dr. {a}?", f"The phone extension of Dr. {a} is", b)
                     for a, b in zip(names[:asked], exts[:asked])]
    start = rng.choice(sentence_starts())
    context = weave(haystack_units("prose", words, start), inserts)
    return {"task": task, "index": i, "depths": depths, "context": context, "questions": questions}


def duo(probe_set: str, args) -> str:
    return (f"duo_attention(retrieval={args.retrieval}, sink={args.sink}, recent={args.recent}, "
            f"probe_set='{probe_set}')")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default=",".join(TASKS), help="held-out task families")
    parser.add_argument("--contexts", type=int, default=4,
                        help="contexts per family (3 questions each)")
    parser.add_argument("--tokens", type=int, default=1200, help="context tokens per case (about)")
    parser.add_argument("--retrieval", type=float, default=0.25)
    parser.add_argument("--sink", type=int, default=16)
    parser.add_argument("--recent", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--out", default=str(RESULTS / "duo_generalise"))
    parser.add_argument("--report", help="only rewrite the markdown of this results JSON")
    args = parser.parse_args(argv)
    if args.report:  # also a .partial.json of an interrupted run
        record = json.loads(Path(args.report).read_text())
        record.setdefault("retrieval_head_overlap", cached_overlap(record))
        target = Path(args.report.replace(".partial", ""))
        target.with_suffix(".json").write_text(json.dumps(record, indent=1))
        target.with_suffix(".md").write_text(report(record))
        return 0
    tasks = [t for t in args.families.split(",") if t]
    load_start, began = os.getloadavg(), time.perf_counter()

    engine = kvlab.load(progress=False)
    tok = engine.tokenizer
    sample = "".join(haystack_units("prose", 1000, 0))
    words = round(1000 * args.tokens / len(tok(sample)["input_ids"]))

    # -- calibration: one per probe set -------------------------------------------------------
    sets = {"passkey": "passkey", "mix": DEFAULT_PROBE_SET}
    for task in tasks:
        minus = ",".join(f for f in PROBE_FAMILIES if f != HELD_OUT[task])
        sets[f"mix-{HELD_OUT[task]}"] = minus
    calibration, splits = {}, {}
    for label, probe_set in sets.items():
        start = time.perf_counter()
        method = kvlab.parse_recipe(duo(probe_set, args)).compress
        split = method.prepare(engine)
        path = duo_heads.score_path(engine, duo_heads.cache_key(engine, method.identification(engine)))
        stored = json.loads(path.read_text())
        splits[label] = {(l, h) for l, row in enumerate(split.retrieval) for h, r in enumerate(row) if r}
        calibration[label] = {"probe_set": probe_set, "seconds_now": round(time.perf_counter() - start, 1),
                              "seconds_measured": stored["seconds"], "retrieval_heads": len(splits[label])}
        print(f"calibrated {label:16s} {probe_set:36s} {calibration[label]}", file=sys.stderr, flush=True)
    overlap = {f"{a}|{b}": len(splits[a] & splits[b]) for a in splits for b in splits if a < b}

    # -- the held-out cases (families interleaved; results written after every context) ------
    rows = []
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i in range(args.contexts):
        for task in tasks:
            held = f"mix-{HELD_OUT[task]}"
            conditions = {"passkey": sets["passkey"], "mix": sets["mix"], held: sets[held]}
            case = make_case(task, i, args.contexts, words)
            recipes = {"full": "full", **{f"duo[{k}]": duo(v, args) for k, v in conditions.items()}}
            result = {"task": task, "index": i, "depths": case["depths"],
                      "expected": [q[2] for q in case["questions"]]}
            full_bytes = None
            for label, recipe in list(recipes.items()) + [("tova", None)]:
                if label == "tova":
                    recipe = f"tova(budget={result['duo[mix]']['bytes_ratio']:.3f})"
                session = engine.session(case["context"], recipe=recipe, mode="multi-request")
                answers = [session.ask(q, answer_prefix=prefix, max_new_tokens=args.max_new_tokens).text
                           for q, prefix, _ in case["questions"]]
                nbytes = session.context_stats.kv_bytes
                full_bytes = full_bytes or nbytes
                result[label] = {"recipe": recipe, "answers": answers,
                                 "correct": [e.lower() in a.lower() for (_, _, e), a in zip(case["questions"], answers)],
                                 "bytes_ratio": round(nbytes / full_bytes, 4),
                                 "tokens": session.context_stats.prompt_tokens}
            rows.append(result)
            marks = " ".join(f"{k}={''.join('Y' if c else '.' for c in v['correct'])}"
                             for k, v in result.items() if isinstance(v, dict))
            print(f"{task} {i:2d} {result['full']['tokens']} tok  {marks}  "
                  f"[{time.perf_counter() - began:.0f}s, load {os.getloadavg()[0]:.2f}]", file=sys.stderr, flush=True)
            partial = {"args": vars(args), "calibration": calibration, "cases": rows}
            out.with_suffix(".partial.json").write_text(json.dumps(partial, indent=1))

    record = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": engine.name, "device": str(engine.device), "cpus": os.cpu_count(),
        "args": vars(args), "load_average_start": load_start, "load_average_end": os.getloadavg(),
        "seconds": round(time.perf_counter() - began, 1), "calibration": calibration,
        "retrieval_head_overlap": overlap, "cases": rows,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    out.with_suffix(".md").write_text(report(record))
    out.with_suffix(".partial.json").unlink(missing_ok=True)
    print(report(record))
    return 0


def cached_overlap(record: dict) -> dict:
    """Retrieval heads shared by two probe sets, from the score files of the kvlab cache."""
    from kvlab.compress.duo_heads import retrieval_heads
    from kvlab.engine.loading import cache_dir

    import torch

    args, wanted = record["args"], {c["probe_set"]: label for label, c in record["calibration"].items()}
    heads = {}
    for path in (cache_dir() / "duo_attention").glob("SmolLM2-135M-Instruct-*.json"):
        stored = json.loads(path.read_text())
        s = stored["settings"]
        if (s["sink"], s["recent"], s["probes"], s["length"], s["score"]) == (args["sink"], args["recent"], 8, 1024, "needle") \
                and s.get("probe_set") in wanted:
            chosen = retrieval_heads(torch.tensor(stored["scores"]), args["retrieval"])
            heads[wanted[s["probe_set"]]] = {(l, h) for l, h in chosen.nonzero().tolist()}
    return {f"{a}|{b}": len(heads[a] & heads[b]) for a in heads for b in heads if a < b}


def report(record: dict) -> str:
    """The markdown table: per held-out family, accuracy (count), ratio to full, bytes ratio."""
    args = record["args"]
    record = {"date": "-", "model": "SmolLM2-135M-Instruct", "device": "cpu", "cpus": os.cpu_count(),
              "load_average_start": [float("nan")], "load_average_end": [float("nan")],
              "seconds": float("nan"), **record}
    lines = [
        "# DuoAttention: do heads found on probes generalise to held-out tasks?",
        "",
        f"`python benchmarks/duo_generalise.py` ({record['date']}; {record['model']} on {record['device']}, "
        f"{record['cpus']} CPUs; load average {record['load_average_start'][0]:.2f} at the start, "
        f"{record['load_average_end'][0]:.2f} at the end; {record['seconds']:.0f} s). "
        f"duo_attention(retrieval={args['retrieval']}, sink={args['sink']}, recent={args['recent']}), "
        f"8 probes x 1024 tokens per probe set; tova at the bytes of duo[mix] on each case; "
        f"~{args['tokens']} context tokens, {args['contexts']} contexts per family, 3 questions "
        "each (multi-request: one compressed prefill answers them all), greedy, "
        "correct = the answer contains the value.",
        "",
        "| held-out family | recipe | heads found on | correct | accuracy | vs full | KV bytes vs full |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for task in dict.fromkeys(r["task"] for r in record["cases"]):
        cases = [r for r in record["cases"] if r["task"] == task]
        labels = [k for k, v in cases[0].items() if isinstance(v, dict)]
        asked = sum(len(r["expected"]) for r in cases)
        full = sum(map(sum, (r["full"]["correct"] for r in cases)))
        for label in labels:
            right = sum(map(sum, (r[label]["correct"] for r in cases)))
            ratio = sum(r[label]["bytes_ratio"] for r in cases) / len(cases)
            method = label.split("[")[0]
            found = label[len("duo["):-1] if label.startswith("duo[") else "-"
            versus = f"{right / full:.2f}x" if full else "-"
            lines.append(f"| {task} | {method} | {found} | {right}/{asked} | {right / asked:.3f} | "
                         f"{versus} | {ratio:.3f} |")
    toks = [r["full"]["tokens"] for r in record["cases"]]
    lines += ["", f"Context tokens (with the chat template): {min(toks)}-{max(toks)}.", "",
              "Calibration (probe sets; seconds measured when the scores were first computed):", "",
              "| label | probe_set | seconds | retrieval heads |", "| --- | --- | --- | --- |"]
    for label, c in record["calibration"].items():
        lines.append(f"| {label} | {c['probe_set']} | {c['seconds_measured']} | {c['retrieval_heads']} |")
    lines += ["", "Retrieval heads two probe sets share: " + ", ".join(
        f"{k.replace('|', ' & ')}: {v}" for k, v in record["retrieval_head_overlap"].items()) + ".", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

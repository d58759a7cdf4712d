"""APE vs ``full`` on a multi-document needle task, and time to first token over cached documents.

    python benchmarks/ape.py                       # 8 cases x 4 documents of ~600 tokens
    python benchmarks/ape.py --cases 4 --docs 4 --doc-words 500 --repeats 3

Each case: ``--docs`` passages of prose (``--doc-words`` words each, ~1.3 tokens a word on
SmolLM2's tokenizer), one of them holding RULER's needle ``One of the special magic numbers
for KEY is: VALUE.`` at a random depth of a random passage; the question asks for KEY's number
(correct: the 7-digit value in the answer, greedy, 16 new tokens). Every recipe gets the same
token ids (:meth:`kvlab.reuse.documents.Documents.sequential_ids`):

- ``full``: prefix, passages and question encoded together (the reference);
- ``ape`` at the authors' defaults (T = S = 0.9), and ``ape(temperature=1.0, scale=1.0)``
  (plain parallel encoding with the shared prefix: no temperature, no scaling), each passage
  encoded once after the shared prefix and joined.

Time to first token (one torch thread, measured side by side, alternating, median of
``--repeats``): a question over already-encoded passages (join + the question's prefill + the
first token) vs encoding everything (``full``: the whole prompt's prefill + the first token).
Results: ``--out`` (JSON) and the same table as Markdown beside it.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch

import kvlab
from kvlab.bench.tasks.niah import needle
from kvlab.bench.tasks.words import random_keys, random_numbers
from kvlab.corpus import haystack_units, sentence_starts, weave

INSTRUCTION = ("Some passages follow; one of them hides a special magic number. Read them all, "
               "I will quiz you about the number afterwards.\n\n")
RECIPES = ("ape", "ape(temperature=1.0, scale=1.0)")


def case(rng: random.Random, docs: int, words: int, distractors: int = 0) -> tuple[list[str], str, str, str]:
    """Passages, the question, its answer prefix and the gold value; ``distractors`` more
    needles (other keys, other numbers) in random passages."""
    key, *others = random_keys(rng, 1 + distractors, "")
    value, *other_values = random_numbers(rng, 1 + distractors, 7)
    hidden: dict[int, list[str]] = {}  # passage -> its needles
    for k, v in [(key, value), *zip(others, other_values)]:
        hidden.setdefault(rng.randrange(docs), []).append(needle(k, v))
    passages = []
    for i in range(docs):
        units = haystack_units("prose", words, rng.choice(sentence_starts()))
        inserts = [(round(rng.random(), 4), n) for n in hidden.get(i, [])]  # each at a random depth
        passages.append(f"Passage {i + 1}:\n" + weave(units, inserts) + "\n\n")
    question = f"What is the special magic number for {key} mentioned in the provided passages?"
    prefix = f"The special magic number for {key} mentioned in the provided passages is"
    return passages, question, prefix, value


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=8)
    parser.add_argument("--docs", type=int, default=4)
    parser.add_argument("--doc-words", type=int, default=480)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--distractors", type=int, default=0, help="needles of other keys (RULER's multikey)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/ape.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine = kvlab.load()
    engine.progress = False
    rng = random.Random(args.seed)
    rows = {name: [] for name in ("full", *RECIPES)}
    tokens: list[dict[str, int]] = []
    started = time.perf_counter()
    for c in range(args.cases):
        passages, question, answer_prefix, value = case(rng, args.docs, args.doc_words, args.distractors)
        sets = {recipe: engine.documents(recipe, INSTRUCTION) for recipe in RECIPES}
        keys = {RECIPES[0]: [sets[RECIPES[0]].add(p) for p in passages]}
        for recipe in RECIPES[1:]:  # a passage's encoding does not depend on T or S: encoded once
            sets[recipe].cache = sets[RECIPES[0]].cache
            keys[recipe] = keys[RECIPES[0]]
        docs = sets[RECIPES[0]]
        ids = docs.sequential_ids(question, keys[RECIPES[0]], answer_prefix)
        tokens.append({"prompt": len(ids), "passages": [len(docs.cache[k]) for k in keys[RECIPES[0]]]})
        full = engine.generate_ids(ids, "full", max_new_tokens=16)
        rows["full"].append({"case": c, "correct": value in full.text, "answer": full.text})
        for recipe, d in sets.items():
            answer = d.ask(question, keys[recipe], answer_prefix, max_new_tokens=16)
            rows[recipe].append({"case": c, "correct": value in answer.text, "answer": answer.text})
        print(f"case {c}: {len(ids)} tokens; " + "; ".join(
            f"{name} {'ok' if r[-1]['correct'] else 'miss'}" for name, r in rows.items()), flush=True)
    # time to first token: a question over the last case's cached passages vs encoding them all
    ape_s, full_s = [], []
    for _ in range(args.repeats):
        ape_s.append(timed(lambda: docs.ask(question, keys[RECIPES[0]], answer_prefix, max_new_tokens=1)))
        full_s.append(timed(lambda: engine.generate_ids(ids, "full", max_new_tokens=1)))
    encode_s = timed(lambda: [docs.add(p + " ") for p in passages])  # new texts: encoded now
    result = {
        "model": engine.name, "device": str(engine.device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.machine(), "cases": args.cases,
        "docs": args.docs, "doc_words": args.doc_words, "distractors": args.distractors, "seed": args.seed,
        "mean_prompt_tokens": statistics.mean(t["prompt"] for t in tokens),
        "mean_passage_tokens": statistics.mean(n for t in tokens for n in t["passages"]),
        "accuracy": {name: sum(r["correct"] for r in rs) / len(rs) for name, rs in rows.items()},
        "ttft_s": {"ape_cached": statistics.median(ape_s), "full": statistics.median(full_s),
                   "ape_cached_all": ape_s, "full_all": full_s},
        "ttft_speedup": statistics.median(full_s) / statistics.median(ape_s),
        "encode_passages_s": encode_s, "ttft_prompt_tokens": len(ids),
        "load_average": list(__import__("os").getloadavg()), "wall_s": time.perf_counter() - started,
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    table = [
        f"APE vs full on {args.cases} cases x {args.docs} passages (mean {result['mean_passage_tokens']:.0f} "
        f"tokens each, prompt {result['mean_prompt_tokens']:.0f} tokens, {args.distractors} distractor "
        f"needles), {engine.name}, {engine.device}, "
        f"{result['threads']} torch thread, load average {result['load_average'][0]:.1f}",
        "",
        "| recipe | accuracy |",
        "|---|---|",
        *(f"| `{name}` | {acc:.0%} ({sum(r['correct'] for r in rows[name])}/{len(rows[name])}) |"
          for name, acc in result["accuracy"].items()),
        "",
        f"Time to first token, {len(ids)}-token prompt (median of {args.repeats}): "
        f"APE over cached passages {result['ttft_s']['ape_cached'] * 1000:.0f} ms, "
        f"full {result['ttft_s']['full'] * 1000:.0f} ms: {result['ttft_speedup']:.1f}x faster; "
        f"encoding the {args.docs} passages apart took {encode_s * 1000:.0f} ms once.",
    ]
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()

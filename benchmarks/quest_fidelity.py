"""Quest fidelity probe against full attention on the real default model (SmolLM2-135M).

A ~2k-token pass-key prompt is prefilled, then the answer is teacher-forced under each Quest
variant. In every sparse layer and decoding step the probe computes full attention's weights
for the same query (``ctx.logits``) and reports, averaged over layers, heads and steps:

- ``mass``: the attention mass full attention puts on the entries Quest reads;
- ``recall``: the share of full's top-k entries (k = entries Quest reads) that Quest reads;
- ``sink``: how often page 0 (the attention sink) is read; ``last``: the partial last page;
- ``bound ok``: share of pages whose score bounds every ``q . k`` in them (checks rotation);
- ``KL``: KL(full || quest) of the next-token distributions over the answer tokens, and
  ``answer``: whether every answer token is the argmax (teacher-forced).

    python benchmarks/quest_fidelity.py [--tokens 2000] [--out benchmarks/results/quest_fidelity.md]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

import kvlab
from kvlab.retrieve.quest import Quest

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
VARIANTS = [
    "quest(budget=0.25)",
    "quest(budget=0.25, sink=16)",
    "quest(budget=0.25, sink=16, recent=64)",
]


def prompt(engine, tokens: int) -> tuple[list[int], list[int]]:
    tok = engine.tokenizer
    reps = max(1, tokens // len(tok.encode(FILLER)) // 2)
    text = (
        "There is a pass key hidden in this text. Find it and remember it.\n" + FILLER * reps
        + "The pass key is 71432. Remember it. 71432 is the pass key. " + FILLER * reps
        + "\nWhat is the pass key? The pass key is"
    )
    return tok.encode(text), tok.encode(" 71432.")


def probe(engine, recipe: str, ids: list[int], answer: list[int], stats: list | None):
    original = Quest.attend

    def attend(self, q, ctx):
        selection = self.select(q, ctx)
        if selection is not None and stats is not None:
            valid = selection.valid  # [b, Hq, r]; entries are gathered per KV head
            entries = selection.entries.repeat_interleave(valid.shape[1] // selection.entries.shape[1], 1)
            n = ctx.layer.num_entries
            logits = ctx.logits(q, ctx.positions)[:, :, 0]  # [b, Hq, n]
            probs = torch.softmax(logits, dim=-1)
            # entries may repeat (clamped, or a fixed entry a page already holds): count once
            read = torch.zeros_like(probs).scatter_add_(-1, entries, valid.float()) > 0
            k = int(read.sum(-1).max())
            top = probs.topk(k, dim=-1).indices
            page = self.page
            pages = -(-n // page)
            raw = logits / ctx.scaling
            pad = pages * page - n
            per_page = torch.nn.functional.pad(raw, (0, pad), value=float("-inf")).reshape(*raw.shape[:2], pages, page)
            bound = self.scores(ctx.rotary.rotate(q, ctx.positions), ctx.layer)
            stats.append(dict(
                mass=float((probs * read).sum(-1).mean()),
                recall=float(read.gather(-1, top).float().mean()),
                sink=float(read[..., 0].float().mean()),
                last=float(read[..., -1].float().mean()),
                bound=float((bound >= per_page.amax(-1) - 1e-3).float().mean()),
            ))
        return original(self, q, ctx)

    Quest.attend = attend
    try:
        sequence = engine.new_sequence(recipe)
        logits = engine.prefill(sequence, ids, compress=True, progress=False)
        return engine.teacher_force(sequence, logits, answer)
    finally:
        Quest.attend = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--variants", default=";".join(VARIANTS), help="';'-separated recipes")
    parser.add_argument("--out", default="benchmarks/results/quest_fidelity.md")
    args = parser.parse_args()
    engine = kvlab.load(progress=False)
    ids, answer = prompt(engine, args.tokens)
    full = probe(engine, "full", ids, answer, None)
    rows = []
    for recipe in args.variants.split(";"):
        stats: list = []
        got = probe(engine, recipe, ids, answer, stats)
        kl = float((full.exp() * (full - got)).sum(-1).mean())
        correct = bool((got.argmax(-1) == torch.tensor(answer)).all())
        mean = {key: sum(s[key] for s in stats) / len(stats) for key in stats[0]}
        rows.append((recipe, mean, kl, correct, float(got.gather(-1, torch.tensor(answer)[:, None]).sum())))
    full_ok = bool((full.argmax(-1) == torch.tensor(answer)).all())
    lines = [
        f"Measured {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} by benchmarks/quest_fidelity.py: "
        f"{engine.name}, {len(ids)}-token pass-key prompt, {len(answer)} answer tokens teacher-forced; "
        f"load average {os.getloadavg()[0]:.2f}. full answers correctly: {full_ok}, "
        f"answer log-prob {float(full.gather(-1, torch.tensor(answer)[:, None]).sum()):.2f}.",
        "",
        "| recipe | mass on read | recall of full's top-k | sink page read | last page read | bound ok | KL(full‖quest) | answer log-prob | answer argmax |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for recipe, m, kl, correct, lp in rows:
        lines.append(
            f"| `{recipe}` | {m['mass']:.3f} | {m['recall']:.3f} | {m['sink']:.3f} | {m['last']:.3f} "
            f"| {m['bound']:.4f} | {kl:.4f} | {lp:.2f} | {correct} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()

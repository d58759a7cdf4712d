"""Run the hand-written mutants of tests/MUTANTS.md: each must make its tests fail.

    python -m tests.compress.mutate            # every mutant
    python -m tests.compress.mutate quest      # the mutants whose id starts with "quest"

Each mutant replaces one exact text (found exactly once) in one method file, runs the tests
that should catch it, and restores the file byte for byte, whatever happens.
A mutant whose tests still pass is reported as SURVIVED and the exit status is 1.
Not collected by pytest (no ``test_`` prefix): it runs the suite, it is not part of it.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_mutants() -> list[tuple[str, str, str, str, str]]:
    """``(id, file, old, new, tests)`` rows from tests/MUTANTS.md's table (``|``-separated;
    ``old`` and ``new`` in backticks, ``\\n`` for a newline)."""
    rows = []
    for line in (ROOT / "tests" / "MUTANTS.md").read_text().splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) < 6 or not cells[0].startswith("`"):
            continue
        mid, file, old, new, tests = cells[:5]
        unquote = lambda s: s.strip("`").replace("\\n", "\n").replace("\\|", "|")  # noqa: E731
        rows.append((unquote(mid), unquote(file), unquote(old), unquote(new), unquote(tests)))
    return rows


def run(mutant: tuple[str, str, str, str, str]) -> bool:
    """True when the mutant is caught (its tests fail)."""
    mid, file, old, new, tests = mutant
    path = ROOT / file
    original = path.read_bytes()
    text = original.decode()
    if text.count(old) != 1:
        print(f"{mid}: BROKEN (the text to mutate occurs {text.count(old)} times in {file})")
        return False
    try:
        path.write_text(text.replace(old, new))
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p",
             "no:warnings", *tests.split()],
            cwd=ROOT, capture_output=True, text=True,
        )
    finally:
        path.write_bytes(original)
    caught = result.returncode != 0
    failed = [ln.split(" ")[1] for ln in result.stdout.splitlines() if ln.startswith("FAILED ")]
    names = [f.split("::", 1)[-1] for f in failed]
    print(f"{mid}: {'caught by ' + ', '.join(names) if caught and failed else 'caught' if caught else 'SURVIVED'}", flush=True)
    return caught


def main(argv: list[str]) -> int:
    mutants = [m for m in load_mutants() if not argv or any(m[0].startswith(a) for a in argv)]
    survived = [m[0] for m in mutants if not run(m)]
    print(f"{len(mutants) - len(survived)}/{len(mutants)} mutants caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

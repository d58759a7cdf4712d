"""Long-context benchmarks: generated RULER/SCBench-style cases, metrics and JSONL loaders.

- :mod:`kvlab.bench.cases`: :class:`Case` (one context) and :class:`Turn` (one question).
- :mod:`kvlab.bench.tasks`: ``TASKS``, deterministic generators fitted to a token budget
  (RULER, arXiv:2404.06654; SCBench, arXiv:2412.10319).
- :mod:`kvlab.bench.metrics`: :func:`score` (string_match_all, string_match_part, contains,
  first_number).
- :mod:`kvlab.bench.loaders`: :func:`load_jsonl` for local RULER, LongBench and SCBench files.
"""

from __future__ import annotations

from kvlab.bench.cases import Case, Turn
from kvlab.bench.loaders import FORMATS, load_jsonl
from kvlab.bench.metrics import METRICS, score
from kvlab.bench.tasks import TASKS, Task, generate, get_task

__all__ = [
    "FORMATS", "METRICS", "TASKS", "Case", "Task", "Turn",
    "generate", "get_task", "load_jsonl", "score",
]

"""The results store: one DuckDB table, one row per case x recipe x turn.

A benchmark directory holds ``results.duckdb``. Rows of one (case, recipe) pair are written in
one transaction when the pair finishes, so an interrupted run loses only the pair in flight and
a rerun skips every finished pair. ``settings_id`` identifies everything that changes results
besides the case and the recipe (model, mode, generation length, ...): different settings are
different rows, never overwrites.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

DB_NAME = "results.duckdb"

COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("settings_id", "VARCHAR", "hash of the settings that change results (model, mode, ...)"),
    ("model", "VARCHAR", "model name"),
    ("mode", "VARCHAR", "single, multi-request or multi-turn"),
    ("task", "VARCHAR", "task name"),
    ("family", "VARCHAR", "ruler, scbench or file"),
    ("case_id", "VARCHAR", "stable case id"),
    ("target_tokens", "INTEGER", "requested context length (tokens)"),
    ("depth", "DOUBLE", "needle depth in [0, 1] (NULL when not a needle task)"),
    ("recipe", "VARCHAR", "canonical recipe string"),
    ("recipe_label", "VARCHAR", "the recipe as the user wrote it"),
    ("turn", "INTEGER", "0-based turn index"),
    ("question", "VARCHAR", "question text"),
    ("gold", "VARCHAR", "gold answers, JSON list"),
    ("prediction", "VARCHAR", "generated answer"),
    ("metric", "VARCHAR", "metric name"),
    ("score", "DOUBLE", "accuracy in [0, 1] by the task's metric"),
    ("token_agreement", "DOUBLE", "fraction of answer tokens equal to the full recipe's (NULL for full)"),
    ("kl", "DOUBLE", "mean KL(full || recipe) of next-token distributions over the full answer, nats"),
    ("context_tokens", "INTEGER", "tokens of the shared context"),
    ("prompt_tokens", "INTEGER", "tokens before this turn's answer"),
    ("new_tokens", "INTEGER", "generated tokens"),
    ("kv_tokens", "DOUBLE", "cache entries per layer and KV head when the answer ended"),
    ("kv_bytes", "BIGINT", "bytes of every tensor the cache held when the answer ended"),
    ("context_kv_bytes", "BIGINT", "bytes the cache held after the context was prefilled and compressed"),
    ("context_prefill_s", "DOUBLE", "seconds to prefill (and compress) the context"),
    ("prefill_s", "DOUBLE", "seconds to prefill this turn's question"),
    ("decode_s", "DOUBLE", "seconds of decoding this turn"),
    ("decode_s_per_token", "DOUBLE", "decode seconds per generated token"),
    ("peak_rss_bytes", "BIGINT", "peak resident memory of the process during the case (bytes)"),
    ("device", "VARCHAR", "cpu or cuda:N"),
    ("created_at", "TIMESTAMP", "when the row was written"),
)
COLUMN_NAMES = tuple(name for name, _, _ in COLUMNS)


@dataclass(frozen=True)
class PairKey:
    settings_id: str
    case_id: str
    recipe: str


class ResultStore:
    """The ``results`` table of a benchmark directory."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / DB_NAME
        self._db = duckdb.connect(str(self.path))
        columns = ", ".join(f"{name} {kind}" for name, kind, _ in COLUMNS)
        self._db.execute(
            f"CREATE TABLE IF NOT EXISTS results ({columns}, "
            "PRIMARY KEY (settings_id, case_id, recipe, turn))"
        )

    def finished(self, settings_id: str) -> set[PairKey]:
        """The (case, recipe) pairs of ``settings_id`` already stored."""
        rows = self._db.execute(
            "SELECT DISTINCT case_id, recipe FROM results WHERE settings_id = ?", [settings_id]
        ).fetchall()
        return {PairKey(settings_id, case, recipe) for case, recipe in rows}

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Write the rows of one finished (case, recipe) pair, atomically."""
        if not rows:
            return
        missing = [c for c in COLUMN_NAMES if c != "created_at" and c not in rows[0]]
        if missing:
            raise ValueError(f"result rows lack columns: {', '.join(missing)}")
        placeholders = ", ".join("?" for _ in COLUMN_NAMES[:-1])
        names = ", ".join(COLUMN_NAMES[:-1])
        self._db.execute("BEGIN TRANSACTION")
        try:
            self._db.executemany(
                f"INSERT OR REPLACE INTO results ({names}, created_at) VALUES ({placeholders}, now())",
                [[row[c] for c in COLUMN_NAMES[:-1]] for row in rows],
            )
            self._db.execute("COMMIT")
        except Exception:
            self._db.execute("ROLLBACK")
            raise

    def query(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        """Rows of a SQL query over the ``results`` table, as dicts."""
        cursor = self._db.execute(sql, params or [])
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def rows(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM results ORDER BY task, target_tokens, case_id, recipe, turn")

    def count(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM results").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

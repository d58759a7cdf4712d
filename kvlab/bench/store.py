"""The results store: DuckDB tables ``results`` (one row per case x recipe x turn), ``speed``
and ``perplexity``.

``perplexity`` holds the rows of ``kvlab ppl`` (:mod:`kvlab.bench.perplexity`): one row per
recipe x document length x position bin (:data:`PPL_COLUMNS`; :meth:`ResultStore.add_perplexity`).

``speed`` holds the timings of ``benchmarks/speed.py`` (time vs context length): one row per
run x context length x variant x repeat, with the physical bounds and machine rates measured in
the same run (:data:`SPEED_COLUMNS`; :meth:`ResultStore.add_speed`, :meth:`ResultStore.speed_rows`).
A store may hold either table or both; ``kvlab report`` renders what it holds.

A benchmark directory holds ``results.duckdb``. Rows of one (case, recipe) pair are written in
one transaction when the pair finishes, so an interrupted run loses only the pair in flight and
a rerun skips every finished pair. ``settings_id`` identifies everything that changes results
besides the case and the recipe (model, mode, generation length, ...): different settings are
different rows, never overwrites.

Rows are only ever added: a row whose (settings, case, recipe, turn) key is already stored is
refused with a :class:`~kvlab.errors.StoreError`, never replaced (a rerun skips finished pairs
before it runs them, see :meth:`ResultStore.finished`). Every failure to open, read or write
the file (another process holds it, it is corrupt or truncated, the directory is read-only)
is a :class:`~kvlab.errors.StoreError` that names the file and says what to do; a file kvlab
cannot read is left untouched. ``kvlab report`` opens the store read-only
(``ResultStore(dir, read_only=True)``), so archived results on read-only media render.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from kvlab.errors import StoreError

DB_NAME = "results.duckdb"

COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("settings_id", "VARCHAR", "hash of the settings that change results (model, mode, ...)"),
    ("model", "VARCHAR", "model name"),
    ("mode", "VARCHAR", "single, multi-request or multi-turn"),
    ("prompt", "VARCHAR", "prompt form: chat (the model's chat template) or raw (the data file's text as is)"),
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
    ("reference", "VARCHAR", "the fidelity reference recipe (canonical; full by default)"),
    ("token_agreement", "DOUBLE", "fraction of answer tokens equal to the reference recipe's (NULL for the reference)"),
    ("kl", "DOUBLE", "mean KL(reference || recipe) of next-token distributions over the reference's answer, nats"),
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


SPEED_TABLE = "speed"
SPEED_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("run_id", "VARCHAR", "one speed.py run: its start time (ISO 8601) and host"),
    ("model", "VARCHAR", "model name"),
    ("device", "VARCHAR", "cpu or cuda:N"),
    ("dtype", "VARCHAR", "weights and KV dtype: float32, bfloat16 or float16"),
    ("threads", "INTEGER", "torch CPU threads"),
    ("context_length", "INTEGER", "context tokens: prompt + decoded tokens"),
    ("variant", "VARCHAR", "transformers, full or the recipe as given"),
    ("recipe", "VARCHAR", "the recipe run, with any position method added past the window "
                          "(NULL for transformers)"),
    ("position", "VARCHAR", "position method added past the model's window (NULL: none)"),
    ("repeat_index", "INTEGER", "0-based round at this length"),
    ("new_tokens", "INTEGER", "decoding steps timed"),
    ("prefill_s", "DOUBLE", "seconds to prefill the prompt"),
    ("decode_ms_per_token", "DOUBLE", "milliseconds per decoding step"),
    ("prefill_bound_s", "DOUBLE", "lower bound: matmul FLOPs / measured matmul FLOP/s"),
    ("decode_bound_ms_per_token", "DOUBLE",
     "lower bound: (weight + KV bytes) / measured memory bandwidth, ms"),
    ("kv_bytes", "BIGINT", "bytes the cache held after the decoding steps (side indexes included)"),
    ("weight_bytes", "BIGINT", "bytes of the weights one decoding step reads"),
    ("prefill_flops", "DOUBLE", "matmul FLOPs of the prefill (linear layers + attention)"),
    ("memory_bandwidth_bytes_per_s", "DOUBLE", "measured in the run: tensor copy bytes / s"),
    ("matmul_flops_per_s", "DOUBLE", "measured in the run: square matmul FLOP/s"),
    ("load_average", "DOUBLE", "1-minute load average when the measurement ended"),
    ("created_at", "TIMESTAMP", "when the row was written"),
)
SPEED_NAMES = tuple(name for name, _, _ in SPEED_COLUMNS)
SPEED_INSERTED = tuple(name for name in SPEED_NAMES if name != "created_at")
_SPEED_KEY = ("run_id", "context_length", "variant", "repeat_index")

PPL_TABLE = "perplexity"
PPL_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("settings_id", "VARCHAR", "hash of model, dtype, document start and bin size"),
    ("model", "VARCHAR", "model name"),
    ("device", "VARCHAR", "cpu or cuda:N"),
    ("dtype", "VARCHAR", "weights and KV dtype"),
    ("threads", "INTEGER", "torch CPU threads"),
    ("recipe", "VARCHAR", "canonical recipe string"),
    ("recipe_label", "VARCHAR", "the recipe as the user wrote it"),
    ("context_window", "INTEGER", "the recipe's context window on the model (tokens)"),
    ("length", "INTEGER", "document length (tokens)"),
    ("doc_start", "INTEGER", "the document's first token in the shipped prose"),
    ("bin_start", "INTEGER", "first position of the bin"),
    ("bin_end", "INTEGER", "position after the bin's last"),
    ("tokens", "INTEGER", "tokens scored in the bin (position 0 has no prediction)"),
    ("nll_sum", "DOUBLE", "sum of the bin's token negative log-likelihoods, nats"),
    ("nll", "DOUBLE", "mean NLL per token in the bin, nats"),
    ("perplexity", "DOUBLE", "exp(nll)"),
    ("seconds", "DOUBLE", "wall seconds of the whole document's forward passes"),
    ("load_average", "DOUBLE", "1-minute load average when the document finished"),
    ("created_at", "TIMESTAMP", "when the row was written"),
)
PPL_NAMES = tuple(name for name, _, _ in PPL_COLUMNS)
PPL_INSERTED = tuple(name for name in PPL_NAMES if name != "created_at")
_PPL_KEY = ("settings_id", "recipe", "length", "bin_start")

INSERTED = tuple(name for name in COLUMN_NAMES if name != "created_at")
# columns added after the first release: a store written before lacks them (filled on open)
_ADDED = {"prompt": "'chat'", "reference": "'full'"}
_KEY = ("settings_id", "case_id", "recipe", "turn")


@dataclass(frozen=True)
class PairKey:
    settings_id: str
    case_id: str
    recipe: str


def _lock_holder(message: str) -> str:
    """'PID 123, /usr/bin/python3' out of DuckDB's lock message (or 'another process')."""
    match = re.search(r"held in (.+?) \(PID (\d+)\)", message)
    return f"PID {match.group(2)}, {match.group(1)}" if match else "another process"


def store_error(path: Path, exc: Exception, *, read_only: bool) -> StoreError:
    """A clear :class:`StoreError` for a DuckDB (or OS) failure on the store at ``path``."""
    message = str(exc)
    where = str(path.parent)
    if "Conflicting lock" in message or "Could not set lock" in message:
        holder = _lock_holder(message)
        if read_only:
            return StoreError(
                f"cannot read the results store {path}: another process ({holder}) has it open "
                "for writing, probably a kvlab bench still running on this directory, and DuckDB "
                "lets no other process read a file while it is being written; wait for that "
                f"run to finish, then run `kvlab report {where}` again"
            )
        return StoreError(
            f"cannot open the results store {path}: another process ({holder}) holds its lock, "
            "probably another kvlab bench or kvlab report on the same directory; wait for it "
            "to finish, or pick another --out"
        )
    corrupt = ("not a valid DuckDB database", "Could not read enough bytes", "Corrupt",
               "checksum", "Serialization", "INTERNAL Error")
    if any(c.lower() in message.lower() for c in corrupt) or isinstance(
        exc, duckdb.SerializationException | duckdb.InternalException
    ):
        return StoreError(
            f"the results store {path} is corrupt or truncated ({message.strip()}); kvlab left "
            "it untouched: move it away (or restore a copy) to start a new store there, or "
            "pick another --out"
        )
    if any(c in message for c in ("Read-only file system", "Permission denied",
                                  "Operation not permitted")) or isinstance(exc, PermissionError):
        return StoreError(
            f"cannot write the results store {path}: the directory {where} is not writable "
            f"({message.strip()}); pick a writable --out (to render stored results from "
            "read-only media, `kvlab report DIR --output FILE` only reads them)"
        )
    if "different configuration" in message:
        return StoreError(
            f"the results store {path} is already open in this process with other settings "
            "(read-only vs read-write); close it first"
        )
    return StoreError(f"cannot use the results store {path}: {message.strip()}")


class ResultStore:
    """The ``results`` table of a benchmark directory.

    ``read_only=True`` opens an existing store without ever writing to it (``kvlab report``);
    the default creates the directory and the table when missing. Failures raise
    :class:`~kvlab.errors.StoreError` (see :func:`store_error`).
    """

    def __init__(self, directory: str | Path, *, read_only: bool = False) -> None:
        self.directory = Path(directory)
        self.path = self.directory / DB_NAME
        self.read_only = read_only
        if read_only:
            if not self.path.is_file():
                raise StoreError(
                    f"no results store {self.path}: run `kvlab bench --out {self.directory}` first"
                )
        else:
            if self.directory.exists() and not self.directory.is_dir():
                raise StoreError(
                    f"--out {str(self.directory)!r} is a file, not a directory; pick a directory "
                    "for the results"
                )
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(
                    f"cannot create the results directory {self.directory} ({exc.strerror}); "
                    "pick a writable --out"
                ) from None
        if not read_only and self.path.exists():
            self._open(read_only=True)  # check an existing file before anything may write to it
            self._db.close()
        self._open(read_only=read_only)

    def _open(self, *, read_only: bool) -> None:
        try:
            self._db = duckdb.connect(str(self.path), read_only=read_only)
        except (duckdb.Error, OSError) as exc:
            raise store_error(self.path, exc, read_only=self.read_only) from None
        try:
            self._prepare(read_only)
        except StoreError:
            self._db.close()
            raise
        except (duckdb.Error, OSError) as exc:
            self._db.close()
            raise store_error(self.path, exc, read_only=self.read_only) from None

    def _prepare(self, read_only: bool) -> None:
        """Check (read-only) or create the table; add columns that an older store lacks."""
        self._defaults: dict[str, str] = {}
        present = self._columns("results")
        self.has_speed = self._side_table(SPEED_TABLE, SPEED_COLUMNS, _SPEED_KEY, "a speed table",
                                          "benchmarks/speed.py", "--store", read_only)
        self.has_perplexity = self._side_table(PPL_TABLE, PPL_COLUMNS, _PPL_KEY, "a perplexity table",
                                               "kvlab ppl", "--out", read_only)
        self.has_results = bool(present)
        if not present:
            if read_only:
                if self.has_speed or self.has_perplexity:
                    return  # speed timings (benchmarks/speed.py --store) or kvlab ppl only
                raise StoreError(
                    f"{self.path} is a DuckDB file but holds no kvlab results table (not "
                    "written by kvlab bench?); point kvlab report at a kvlab bench --out directory"
                )
            columns = ", ".join(f"{name} {kind}" for name, kind, _ in COLUMNS)
            self._db.execute(
                f"CREATE TABLE results ({columns}, PRIMARY KEY ({', '.join(_KEY)}))"
            )
            self.has_results = True
            return
        missing = [c for c in COLUMN_NAMES if c not in present and c not in _ADDED]
        if missing:
            raise StoreError(
                f"{self.path} holds a results table without the columns {', '.join(missing)} "
                "(not written by kvlab bench?); it was left untouched: pick another --out"
            )
        for name, default in _ADDED.items():
            if name not in present and not read_only:
                kind = next(k for n, k, _ in COLUMNS if n == name)
                self._db.execute(f"ALTER TABLE results ADD COLUMN {name} {kind} DEFAULT {default}")
        if read_only:
            self._defaults = {n: d.strip("'") for n, d in _ADDED.items() if n not in present}
        # read every stored value once, so a truncated or damaged file is found here
        self._db.execute("SELECT max(length(CAST(COLUMNS(*) AS VARCHAR))) FROM results").fetchall()

    def _side_table(
        self, table: str, columns: tuple[tuple[str, str, str], ...], key: tuple[str, ...],
        what: str, writer: str, flag: str, read_only: bool,
    ) -> bool:
        """Check that a table beside ``results`` (speed, perplexity) has every column, or
        create it when missing and writable; True when the store has it."""
        present = self._columns(table)
        missing = [name for name, _, _ in columns if name not in present]
        if present and missing:
            raise StoreError(
                f"{self.path} holds {what} without the columns {', '.join(missing)} (not "
                f"written by {writer}?); it was left untouched: pick another {flag}"
            )
        if not present and not read_only:
            spec = ", ".join(f"{name} {kind}" for name, kind, _ in columns)
            self._db.execute(f"CREATE TABLE {table} ({spec}, PRIMARY KEY ({', '.join(key)}))")
            return True
        return bool(present)

    def _columns(self, table: str) -> set[str]:
        return {name for (name,) in self._db.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table]
        ).fetchall()}

    def _run(self, sql: str, params: list[Any] | None = None) -> duckdb.DuckDBPyConnection:
        try:
            return self._db.execute(sql, params or [])
        except (duckdb.Error, OSError) as exc:
            raise store_error(self.path, exc, read_only=self.read_only) from None

    def finished(self, settings_id: str) -> set[PairKey]:
        """The (case, recipe) pairs of ``settings_id`` already stored."""
        rows = self._run(
            "SELECT DISTINCT case_id, recipe FROM results WHERE settings_id = ?", [settings_id]
        ).fetchall()
        return {PairKey(settings_id, case, recipe) for case, recipe in rows}

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Write the rows of one finished (case, recipe) pair, atomically.

        Never replaces a row: a row whose key (settings, case, recipe, turn) is already stored,
        or repeated within ``rows``, raises :class:`StoreError` and nothing is written."""
        if not rows:
            return
        if self.read_only:
            raise StoreError(f"the results store {self.path} was opened read-only")
        missing = [c for c in INSERTED if c not in rows[0]]
        if missing:
            raise ValueError(f"result rows lack columns: {', '.join(missing)}")
        keys = [tuple(row[k] for k in _KEY) for row in rows]
        if len(set(keys)) != len(keys):
            raise StoreError(f"rows to write repeat a (settings, case, recipe, turn) key: {keys}")
        first = keys[0]
        stored = self._run(
            "SELECT turn FROM results WHERE settings_id = ? AND case_id = ? AND recipe = ?",
            list(first[:3]),
        ).fetchall()
        if stored:
            raise StoreError(
                f"{self.path} already holds case {first[1]!r} with recipe {first[2]!r} "
                f"(settings {first[0]}); kvlab never replaces a stored row: two cases with one "
                "id, or a pair run twice, is a bug to report"
            )
        placeholders = ", ".join("?" for _ in INSERTED)
        self._run("BEGIN TRANSACTION")
        try:
            self._db.executemany(
                f"INSERT INTO results ({', '.join(INSERTED)}, created_at) "
                f"VALUES ({placeholders}, now())",
                [[row[c] for c in INSERTED] for row in rows],
            )
            self._db.execute("COMMIT")
        except (duckdb.Error, OSError) as exc:
            self._db.execute("ROLLBACK")
            if isinstance(exc, duckdb.ConstraintException):
                raise StoreError(
                    f"{self.path} already holds a row of case {first[1]!r} with recipe "
                    f"{first[2]!r}; kvlab never replaces a stored row"
                ) from None
            raise store_error(self.path, exc, read_only=False) from None
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def query(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        """Rows of a SQL query over the ``results`` table, as dicts (columns an older store
        lacks are filled with their default)."""
        cursor = self._run(sql, params)
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, row)) for row in cursor.fetchall()]
        if self._defaults and "case_id" in names:
            for row in rows:
                for name, value in self._defaults.items():
                    row.setdefault(name, value)
        return rows

    def add_speed(self, rows: list[dict[str, Any]]) -> None:
        """Write speed rows (:data:`SPEED_COLUMNS`, ``created_at`` filled here) atomically;
        a row whose (run, length, variant, repeat) is already stored is refused, nothing
        written."""
        if rows:
            self._insert(SPEED_TABLE, SPEED_INSERTED, rows, "speed",
                         f"speed rows of run {rows[0]['run_id']!r}")

    def add_perplexity(self, rows: list[dict[str, Any]]) -> None:
        """Write the bin rows of one (recipe, length) document (:data:`PPL_COLUMNS`,
        ``created_at`` filled here) atomically; a stored key is refused, nothing written."""
        if rows:
            self._insert(PPL_TABLE, PPL_INSERTED, rows, "perplexity",
                         f"perplexity rows of recipe {rows[0]['recipe']!r} at length {rows[0]['length']}")

    def _insert(self, table: str, columns: tuple[str, ...], rows: list[dict[str, Any]],
                kind: str, what: str) -> None:
        """Insert ``rows`` (their ``columns``, ``created_at`` filled here) into ``table`` in one
        transaction; a stored key is refused with ``what`` named, nothing written."""
        if self.read_only:
            raise StoreError(f"the results store {self.path} was opened read-only")
        missing = [c for c in columns if c not in rows[0]]
        if missing:
            raise ValueError(f"{kind} rows lack columns: {', '.join(missing)}")
        placeholders = ", ".join("?" for _ in columns)
        self._run("BEGIN TRANSACTION")
        try:
            self._db.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}, created_at) VALUES ({placeholders}, now())",
                [[row[c] for c in columns] for row in rows],
            )
            self._db.execute("COMMIT")
        except (duckdb.Error, OSError) as exc:
            self._db.execute("ROLLBACK")
            if isinstance(exc, duckdb.ConstraintException):
                raise StoreError(f"{self.path} already holds {what}; kvlab never replaces a stored row") from None
            raise store_error(self.path, exc, read_only=False) from None
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def perplexity_done(self, settings_id: str) -> set[tuple[str, int]]:
        """The (recipe, length) documents of ``settings_id`` already stored."""
        if not self.has_perplexity:
            return set()
        rows = self._run(
            f"SELECT DISTINCT recipe, length FROM {PPL_TABLE} WHERE settings_id = ?", [settings_id]
        ).fetchall()
        return {(recipe, int(length)) for recipe, length in rows}

    def perplexity_rows(self) -> list[dict[str, Any]]:
        """Every perplexity bin row, by length, recipe (in the order run) and position."""
        if not self.has_perplexity:
            return []
        return self.query(f"SELECT * FROM {PPL_TABLE} ORDER BY length, created_at, recipe, bin_start")

    def speed_rows(self) -> list[dict[str, Any]]:
        """Every speed row, by run and in the order written (empty when there are none)."""
        if not self.has_speed:
            return []
        return self.query(f"SELECT * FROM {SPEED_TABLE} ORDER BY run_id, rowid")

    def rows(self) -> list[dict[str, Any]]:
        if not self.has_results:
            return []
        return self.query("SELECT * FROM results ORDER BY task, target_tokens, case_id, recipe, turn")

    def count(self) -> int:
        if not self.has_results:
            return 0
        return int(self._run("SELECT count(*) FROM results").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

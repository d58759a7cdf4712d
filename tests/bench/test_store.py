"""The results store's failures: never a replaced row, never a raw DuckDB traceback.

Another process holding the store (a second bench, a report during a bench), a corrupt or
truncated file, a read-only directory: each is a StoreError (exit 2 at the CLI) that names the
file and says what to do, and a file kvlab cannot read is left untouched.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from kvlab.bench.report import build_report
from kvlab.bench.store import COLUMNS, DB_NAME, ResultStore
from kvlab.cli import app
from kvlab.errors import StoreError
from tests.bench.test_summary import synthetic_pairs, write_store

cli = CliRunner()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """A results directory holding the synthetic rows."""
    directory = tmp_path_factory.mktemp("archive")
    write_store(directory, synthetic_pairs())
    return directory


def test_a_stored_row_is_never_replaced(tmp_path):
    pairs = synthetic_pairs()
    write_store(tmp_path, pairs[:2])
    with ResultStore(tmp_path) as store:
        before = store.rows()
        changed = [{**row, "prediction": "something else", "score": 0.0} for row in pairs[0]]
        with pytest.raises(StoreError, match="never replaces a stored row"):
            store.add(changed)
        with pytest.raises(StoreError, match="repeat a"):
            store.add(pairs[2] + pairs[2])
        assert store.rows() == before
        store.add(pairs[2])
        assert store.count() == len(before) + len(pairs[2])


class _Holder:
    """Another process with the store open (for writing unless ``read_only``) until stopped."""

    def __init__(self, directory: Path, read_only: bool = False) -> None:
        code = ("import duckdb, sys\n"
                f"db = duckdb.connect(sys.argv[1], read_only={read_only})\n"
                "print('open', flush=True)\n"
                "sys.stdin.read()\n")
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, str(directory / DB_NAME)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.process.stdout.readline().strip() == "open"  # the lock is held now

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def test_another_process_holding_the_store_is_a_clear_error(archive, tmp_path):
    held = tmp_path / "held"
    shutil.copytree(archive, held)
    holder = _Holder(held)
    try:
        pid = f"PID {holder.process.pid}"
        with pytest.raises(StoreError, match="holds its lock") as caught:
            ResultStore(held)
        assert pid in str(caught.value) and "pick another --out" in str(caught.value)
        with pytest.raises(StoreError, match="open for writing") as caught:
            build_report(held)
        assert pid in str(caught.value) and "wait for that run to finish" in str(caught.value)
        bench = cli.invoke(app, ["bench", "--out", str(held), "--tasks", "niah_single",
                                 "--recipes", "full", "--no-report"])
        report = cli.invoke(app, ["report", str(held)])
    finally:
        holder.stop()
    for result, message in ((bench, "pick another --out"), (report, "wait for that run")):
        assert result.exit_code == 2, result.output
        assert message in result.output and "Traceback" not in result.output
    with ResultStore(held, read_only=True) as copy, ResultStore(archive, read_only=True) as src:
        assert copy.rows() == src.rows()  # nothing was written


def test_a_bench_cannot_write_while_a_report_reads(archive, tmp_path):
    held = tmp_path / "held"
    shutil.copytree(archive, held)
    holder = _Holder(held, read_only=True)
    try:
        with pytest.raises(StoreError, match="holds its lock"):
            ResultStore(held)
    finally:
        holder.stop()
    ResultStore(held).close()  # free again


def _truncated(archive: Path) -> bytes:
    data = (archive / DB_NAME).read_bytes()
    return data[: len(data) // 2]  # DuckDB opens this, and fails reading the rows


@pytest.mark.parametrize("kind", ["garbage", "empty", "truncated", "header only"])
@pytest.mark.parametrize("read_only", [False, True])
def test_a_corrupt_store_is_named_and_left_untouched(archive, tmp_path, kind, read_only):
    blob = {
        "garbage": bytes(range(256)) * 40,
        "empty": b"",
        "truncated": _truncated(archive),
        "header only": (archive / DB_NAME).read_bytes()[:4096],
    }[kind]
    db = tmp_path / DB_NAME
    db.write_bytes(blob)
    before = _digest(db)
    with pytest.raises(StoreError, match="corrupt or truncated") as caught:
        ResultStore(tmp_path, read_only=read_only)
    message = str(caught.value)
    assert str(db) in message and "left it untouched" in message
    assert _digest(db) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [DB_NAME]  # no WAL, nothing new


def test_other_duckdb_files_and_paths(tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    db = duckdb.connect(str(other / DB_NAME))
    db.execute("CREATE TABLE results (a INTEGER)")
    db.close()
    with pytest.raises(StoreError, match="without the columns settings_id"):
        ResultStore(other)
    empty = tmp_path / "empty"
    empty.mkdir()
    duckdb.connect(str(empty / DB_NAME)).close()
    with pytest.raises(StoreError, match="holds no kvlab results table"):
        ResultStore(empty, read_only=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="is a file, not a directory"):
        ResultStore(tmp_path / "file")
    with pytest.raises(StoreError, match="no results store"):
        ResultStore(tmp_path / "nowhere", read_only=True)


def test_a_store_written_before_the_prompt_column(tmp_path):
    old = [(n, k) for n, k, _ in COLUMNS if n != "prompt"]
    db = duckdb.connect(str(tmp_path / DB_NAME))
    db.execute(f"CREATE TABLE results ({', '.join(f'{n} {k}' for n, k in old)})")
    row = {**synthetic_pairs()[0][0]}
    del row["prompt"]
    names = [n for n, _ in old if n != "created_at"]
    db.execute(f"INSERT INTO results ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})",
               [row[n] for n in names])
    db.close()
    with ResultStore(tmp_path, read_only=True) as store:
        assert [r["prompt"] for r in store.rows()] == ["chat"]
    with ResultStore(tmp_path) as store:  # opened for writing: the column is added
        assert [r["prompt"] for r in store.rows()] == ["chat"]


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's read-only /sys")
def test_a_read_only_out_directory(tmp_path):
    # /sys/kernel exists and is not writable, even by root
    with pytest.raises(StoreError, match="is not writable.*pick a writable --out"):
        ResultStore("/sys/kernel")
    with pytest.raises(StoreError, match="cannot create the results directory"):
        ResultStore("/sys/kernel/kvlab-results")


@pytest.fixture
def read_only_archive(archive, tmp_path):
    """A copy of the archive on read-only media: a read-only tmpfs mount when running as root
    (permission bits do not stop root), else a directory without write permission."""
    target = tmp_path / "ro"
    target.mkdir()
    if os.geteuid() != 0:
        shutil.copy(archive / DB_NAME, target / DB_NAME)
        (target / DB_NAME).chmod(0o444)
        target.chmod(0o555)
        yield target
        target.chmod(0o755)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(target)],
                      capture_output=True).returncode != 0:
        pytest.skip("running as root without permission to mount a read-only file system")
    try:
        shutil.copy(archive / DB_NAME, target / DB_NAME)
        subprocess.run(["mount", "-o", "remount,ro", str(target)], check=True)
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_an_archive_on_read_only_media_renders(read_only_archive, tmp_path):
    with pytest.raises(OSError):
        (read_only_archive / "probe").write_text("x")  # really read-only
    before = _digest(read_only_archive / DB_NAME)
    page = build_report(read_only_archive, tmp_path / "page.html")
    assert "kvlab benchmark report" in page.read_text(encoding="utf-8")
    result = cli.invoke(app, ["report", str(read_only_archive)])
    assert result.exit_code == 2 and "--output FILE" in result.output, result.output
    assert "Traceback" not in result.output
    with pytest.raises(StoreError, match="is not writable"):
        ResultStore(read_only_archive)
    assert _digest(read_only_archive / DB_NAME) == before

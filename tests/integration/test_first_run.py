"""A new user's first run on the real default model: a quiet conversion, no warnings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CONTEXT = "The code of the red door is 4417. " * 20


def _python(args: list[str], tmp: Path, cache: Path | None = None) -> subprocess.CompletedProcess:
    """``python ARGS`` in ``tmp``; converted models in ``cache`` (None: the user's cache)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if cache is not None:
        env["KVLAB_CACHE_DIR"] = str(cache)
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, cwd=tmp, timeout=300
    )


def test_the_first_conversion_prints_no_third_party_bars_even_with_json(tmp_path):
    cache = tmp_path / "cache"
    (tmp_path / "context.txt").write_text(CONTEXT)
    ask = ["-m", "kvlab.cli", "ask", "--context-file", "context.txt", "--question",
           "What is the code of the red door?", "--max-new-tokens", "4", "--json"]
    first = _python(ask, tmp_path, cache)
    assert first.returncode == 0, first.stderr
    json.loads(first.stdout)  # stdout is one JSON object, nothing else
    for bar in ("it/s", "%|", "Converting", "Loading weights", "Writing model shards"):
        assert bar not in first.stderr
    converted = list((cache / "models").iterdir())
    assert len(converted) == 1 and (converted[0] / "config.json").is_file()
    own = [line for line in first.stderr.splitlines() if line.startswith("kvlab: converting")]
    assert len(own) <= 1  # warnings are the next test's

    again = _python(["-c", "import kvlab; kvlab.load()"], tmp_path, cache)
    assert again.returncode == 0, again.stderr
    assert again.stderr == "" and again.stdout == ""  # cached: no conversion line either
    assert list((cache / "models").iterdir()) == converted


def test_loading_the_default_model_raises_no_warning():
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import kvlab; kvlab.load(progress=False)"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_kvlab_ask_on_the_default_model_prints_no_warning(tmp_path):
    (tmp_path / "context.txt").write_text(CONTEXT)
    result = _python(
        ["-m", "kvlab.cli", "ask", "--context-file", "context.txt", "--question",
         "What is the code?", "--max-new-tokens", "4"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "Warning" not in result.stderr, result.stderr


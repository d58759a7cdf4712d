"""``kvlab serve`` from the command line: it says where it listens, serves, stops on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx2
import pytest
from typer.testing import CliRunner

from kvlab.cli import app


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serve_starts_answers_and_stops_cleanly_on_sigterm(model_dir, tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("sk-test tester\n")
    port = free_port()
    command = [sys.executable, "-m", "kvlab.cli", "serve", "--model", str(model_dir), "--port", str(port),
               "--api-key-file", str(keys), "--recipe", "snapkv(budget=0.5)", "--max-cache-gib", "0.5"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "COLUMNS": "200"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the server did not answer"
            try:
                health = httpx2.get(f"http://127.0.0.1:{port}/health", timeout=1).json()
                break
            except httpx2.TransportError:
                time.sleep(0.2)
        assert health["recipe"].startswith("snapkv(budget=0.5")
        answer = httpx2.post(
            f"http://127.0.0.1:{port}/v1/completions", timeout=60,
            headers={"Authorization": "Bearer sk-test"},
            json={"model": health["model"], "prompt": "Hello there", "max_tokens": 2, "temperature": 0},
        ).json()
        assert answer["usage"]["completion_tokens"] == 2
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    # uvicorn shuts down gracefully, then re-raises SIGTERM: the status says "terminated"
    assert process.returncode in (0, -signal.SIGTERM), stderr
    assert f"on http://127.0.0.1:{port}/v1" in stderr and "kvlab serve: stopped" in stderr
    assert "Traceback" not in stderr and "Error" not in stderr


@pytest.mark.parametrize("args, message", [
    (["--max-queue", "-1"], "--max-queue -1"),
    (["--recipe", "snapkv(budgt=0.5)"], "budgt"),
    (["--api-key-file", "/nonexistent/keys"], "cannot read it"),
    (["--max-cache-gib", "0"], "--max-cache-gib 0"),
    (["--load-context", "/nonexistent/doc.kv"], "is not a readable file"),
])
def test_serve_refuses_bad_flags_before_loading_a_model(args, message):
    result = CliRunner().invoke(app, ["serve", *args])
    assert result.exit_code == 2 and message in result.output, result.output

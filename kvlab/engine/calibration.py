"""What a method measures once per model, kept on disk: the shared key, file and fingerprint.

DuoAttention's and LycheeDecode's head scores (:mod:`kvlab.compress.duo_heads`) and DPE's
group scales (:mod:`kvlab.position.dpe_search`) are measured on a model once, then read back.
A record lives in ``<kvlab cache dir>/<method>/<model>-<key>.json``, keyed by
:func:`cache_key`: the model's name and configuration, a fingerprint of its weights and dtype,
its tokenizer class, the definition's version and the settings it was measured with. Files
are written atomically (a staged file renamed over the old one).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import weakref
from pathlib import Path
from typing import Any

import torch

_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> weight digest


def cache_key(engine: Any, version: int, settings: dict[str, Any] | None) -> str:
    """Digest of the model (name, configuration, weight fingerprint, dtype, tokenizer class),
    the definition's ``version`` and ``settings``."""
    parts = {
        "version": version,
        "model": engine.name,
        "config": engine.config.to_json_string(use_diff=False),
        "weights": weight_fingerprint(engine.model),
        "tokenizer": type(engine.tokenizer).__name__ if engine.tokenizer is not None else None,
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]


def record_path(engine: Any, key: str, method: str) -> Path:
    """``<kvlab cache dir>/<method>/<model>-<key>.json``."""
    from kvlab.engine.loading import cache_dir

    model = re.sub(r"[^A-Za-z0-9._-]+", "_", engine.name)
    return cache_dir() / method / f"{model}-{key}.json"


def weight_fingerprint(model: torch.nn.Module) -> str:
    """A cheap digest of the weights: the first 64 values of every parameter, and the dtype
    (two random models of one configuration differ; kept per model object, so weights changed
    in place afterwards are not noticed)."""
    if model not in _FINGERPRINTS:
        params = list(model.parameters())
        head = torch.cat([p.detach().reshape(-1)[:64].float() for p in params]).cpu()
        digest = hashlib.sha256(head.numpy().tobytes())
        digest.update(str(params[0].dtype).encode())
        _FINGERPRINTS[model] = digest.hexdigest()
    return _FINGERPRINTS[model]


def read_record(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is missing, unreadable or not an object."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def write_record(path: Path, record: dict[str, Any]) -> None:
    """Write ``record`` to ``path`` as JSON, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(record, out)
        os.replace(staging, path)
    except OSError:
        Path(staging).unlink(missing_ok=True)
        raise


__all__ = ["cache_key", "read_record", "record_path", "weight_fingerprint", "write_record"]

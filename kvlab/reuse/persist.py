"""Persistent KV: an encoded (compressed) session written to disk and read back, exactly.

A file is one safetensors file: its tensors are the byte storages the session's cache holds
(each storage once, whatever views share it: a layer's keys are a view of its storage with
its decoding reserve), and its metadata holds one JSON header, under the key ``kvlab``:

- ``format`` (:data:`FORMAT`), ``kvlab_version``;
- what the cache is valid for: ``model`` (the engine's name), ``model_fingerprint`` (the
  architecture's sizes, the weights' dtype and a hash of the first rows of the input
  embedding: another checkpoint of the same name does not match), ``tokenizer_sha256`` (the
  tokenizer's serialized vocabulary and rules), ``recipe``;
- the session: ``mode``, the context, the text the cache holds, messages, pending tokens, the
  context's stats;
- ``layers``: each layer's state as JSON, with tensors as references into the storages.

Only kvlab's own classes are rebuilt from a file (``kvlab.*`` classes, by name, their fields
set directly: no code from the file runs, unlike pickle); anything else a cache holds (an
external index object) cannot be saved and is refused when saving, naming it. Loading refuses
a file made for another model, tokenizer, recipe, format or kvlab version, naming the field,
the file's value and this engine's.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from kvlab.errors import InputError

FORMAT = "kvlab-kv/1"
"""The file format's name and version: a reader refuses any other."""
HEADER_KEY = "kvlab"


def kvlab_version() -> str:
    """The installed kvlab's version (from its package metadata: importing ``kvlab`` here
    would close an import cycle through the engine)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvlab")
    except PackageNotFoundError:
        return "unknown"


def tokenizer_sha256(tokenizer: Any) -> str:
    """A hash of what the tokenizer maps text to ids with: the fast tokenizer's serialized
    model (vocabulary, merges, normalizers, pre-tokenizers), else its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        data = backend.to_str()
    elif tokenizer is not None:
        data = json.dumps(sorted(tokenizer.get_vocab().items()))
    else:
        data = ""
    return hashlib.sha256(data.encode()).hexdigest()


def model_fingerprint(model: Any) -> dict[str, Any]:
    """The sizes a cache's shapes depend on, the weights' dtype, and a hash of the first eight
    rows of the input embedding (another checkpoint differs there)."""
    config = model.config
    weight = model.get_input_embeddings().weight
    rows = weight[:8].detach().float().cpu().contiguous()
    return {
        "model_type": getattr(config, "model_type", None),
        "layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "attention_heads": config.num_attention_heads,
        "kv_heads": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
        "vocab_size": config.vocab_size,
        "dtype": str(weight.dtype).removeprefix("torch."),
        "embedding_sha256": hashlib.sha256(rows.numpy().tobytes()).hexdigest(),
    }


class _Writer:
    """Object graph -> JSON with tensor references; each storage kept once."""

    def __init__(self) -> None:
        self.storages: dict[tuple[str, int], tuple[str, Tensor]] = {}

    def encode(self, value: Any, where: str) -> Any:
        if value is None or isinstance(value, (bool, int, str)):
            return value
        if isinstance(value, float):
            return {"$float": repr(value)}
        if isinstance(value, Tensor):
            return self.tensor(value)
        if isinstance(value, torch.dtype):
            return {"$dtype": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"$device": None}  # the loading engine's device
        if isinstance(value, (list, tuple)):
            items = [self.encode(v, f"{where}[{i}]") for i, v in enumerate(value)]
            return {"$list" if isinstance(value, list) else "$tuple": items}
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            return {"$dict": {k: self.encode(v, f"{where}.{k}") for k, v in value.items()}}
        cls = type(value)
        if cls.__module__.startswith("kvlab.") and hasattr(value, "__dict__") and not hasattr(cls, "__slots__"):
            state = {k: self.encode(v, f"{where}.{k}") for k, v in vars(value).items()}
            return {"$object": f"{cls.__module__}:{cls.__qualname__}", "state": state}
        raise InputError(
            f"cannot save this cache: {where} holds a {cls.__module__}.{cls.__qualname__}, which "
            "kvlab cannot write safely (saved: tensors, numbers, strings, lists, dicts and kvlab's "
            "own objects); recipes whose methods keep external indexes cannot be saved yet"
        )

    def tensor(self, t: Tensor) -> dict[str, Any]:
        storage = t.untyped_storage()
        key = (str(t.device), storage.data_ptr())
        if key not in self.storages:
            flat = torch.empty(0, dtype=torch.uint8, device=t.device).set_(storage)
            self.storages[key] = (f"storage.{len(self.storages)}", flat.cpu().clone())
        name = self.storages[key][0]
        return {"$tensor": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                "stride": list(t.stride()), "offset": t.storage_offset()}


class _Reader:
    """JSON with tensor references -> the object graph, tensors on ``device``."""

    def __init__(self, tensors: dict[str, Tensor], device: torch.device) -> None:
        self.flat = {name: t.to(device) for name, t in tensors.items()}
        self.device = device

    def decode(self, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        if "$float" in value:
            return float(value["$float"])
        if "$tensor" in value:
            dtype = getattr(torch, value["dtype"])
            typed = self.flat[value["$tensor"]].view(dtype)
            return typed.as_strided(value["shape"], value["stride"], value["offset"])
        if "$dtype" in value:
            return getattr(torch, value["$dtype"])
        if "$device" in value:
            return self.device
        if "$list" in value:
            return [self.decode(v) for v in value["$list"]]
        if "$tuple" in value:
            return tuple(self.decode(v) for v in value["$tuple"])
        if "$dict" in value:
            return {k: self.decode(v) for k, v in value["$dict"].items()}
        if "$object" in value:
            module, _, qualname = value["$object"].partition(":")
            if not module.startswith("kvlab."):
                raise InputError(f"the file names a class outside kvlab ({value['$object']}); not loaded")
            cls: Any = importlib.import_module(module)
            for part in qualname.split("."):
                cls = getattr(cls, part)
            obj = cls.__new__(cls)
            obj.__dict__.update({k: self.decode(v) for k, v in value["state"].items()})
            return obj
        raise InputError(f"unreadable value in the file: {sorted(value)}")


def write(path: str | Path, header: dict[str, Any], layers: list[Any]) -> int:
    """Write ``layers`` (objects) and ``header`` to ``path``; returns the file's bytes."""
    writer = _Writer()
    encoded = [writer.encode(layer, f"layer {i}") for i, layer in enumerate(layers)]
    tensors = {name: t for name, t in writer.storages.values()}
    metadata = {HEADER_KEY: json.dumps({**header, "layers": encoded})}
    path = Path(path)
    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError as exc:
        raise InputError(f"cannot write {str(path)!r}: {exc}") from None
    return path.stat().st_size


def read_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a file (its format checked), without loading its tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{str(path)!r} is not a readable file")
    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
    except (SafetensorError, OSError) as exc:
        raise InputError(f"{str(path)!r} is not a kvlab cache file (not safetensors: {exc})") from None
    if HEADER_KEY not in metadata:
        raise InputError(f"{str(path)!r} is a safetensors file without a kvlab header: not a kvlab cache file")
    header = json.loads(metadata[HEADER_KEY])
    if header.get("format") != FORMAT:
        raise InputError(f"{str(path)!r}: format {header.get('format')!r}, this kvlab reads {FORMAT!r}")
    return header


def read(path: str | Path, device: torch.device) -> tuple[dict[str, Any], list[Any]]:
    """The header and the layers of a file, tensors on ``device``."""
    header = read_header(path)
    reader = _Reader(load_file(str(path)), device)
    return header, [reader.decode(layer) for layer in header["layers"]]


def check_matches(path: str | Path, header: dict[str, Any], expected: dict[str, Any]) -> None:
    """Refuse a file whose header differs from ``expected`` in any of its fields."""
    for name, want in expected.items():
        got = header.get(name)
        if got != want:
            raise InputError(
                f"{str(path)!r} was saved for another {name.replace('_', ' ')}: the file has "
                f"{_show(got)}, this engine has {_show(want)}; encode the context again here"
            )


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


__all__ = ["FORMAT", "check_matches", "model_fingerprint", "read", "read_header", "tokenizer_sha256", "write"]

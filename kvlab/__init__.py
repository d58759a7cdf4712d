"""kvlab: efficient long-context inference on Hugging Face transformers, stage by stage.

The KV cache's life is the architecture: ``kvlab.position``, ``kvlab.prefill``,
``kvlab.compress``, ``kvlab.quantize``, ``kvlab.retrieve`` and ``kvlab.reuse`` hold the
methods of each stage; ``kvlab.engine`` holds the shared mechanics they plug into.

``import kvlab`` is light (the command line starts fast): PyTorch, transformers and the
methods are imported the first time one of the names below is used.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

os.environ["HF_HUB_OFFLINE"] = "1"  # kvlab never downloads, whatever the environment says:
os.environ["TRANSFORMERS_OFFLINE"] = "1"  # a missing file fails fast instead
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from kvlab.errors import InputError, KvlabError, ModelError, RecipeError  # noqa: E402

if TYPE_CHECKING:
    from kvlab.engine.engine import Answer, Engine, Stats
    from kvlab.recipe import Recipe, parse_recipe
    from kvlab.registry import MethodInfo
    from kvlab.reuse.session import Session

__version__ = "0.1.0"

_LAZY = {
    "Answer": "kvlab.engine.engine",
    "Engine": "kvlab.engine.engine",
    "Stats": "kvlab.engine.engine",
    "Recipe": "kvlab.recipe",
    "parse_recipe": "kvlab.recipe",
    "MethodInfo": "kvlab.registry",
    "Session": "kvlab.reuse.session",
}
_PACKAGES = ("compress", "engine", "position", "prefill", "quantize", "retrieve", "reuse", "bench")


def __getattr__(name: str) -> Any:
    """Import a public name or subpackage on first use (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _PACKAGES:
        value = importlib.import_module(f"kvlab.{name}")
    else:
        raise AttributeError(f"module 'kvlab' has no attribute {name!r}")
    globals()[name] = value
    return value


def methods() -> list[MethodInfo]:
    """Every method, ordered by stage then name, with its parameters and paper."""
    from kvlab.registry import methods as registered

    return registered()


def load(
    model: str | os.PathLike[str] | None = None,
    device: str | None = None,
    dtype: str | None = None,
    progress: bool = True,
) -> Engine:
    """Load a model from disk and return an :class:`Engine`.

    ``model``: None for the embedded SmolLM2-135M-Instruct, a local transformers model
    directory, or a ``.gguf`` file. ``device``: ``auto`` (CUDA when available, else CPU),
    ``cpu``, ``cuda[:N]``. ``dtype``: ``auto`` (bfloat16 on CUDA, float32 on CPU), ``float32``,
    ``bfloat16`` or ``float16``.
    """
    from kvlab.engine.engine import Engine
    from kvlab.engine.loading import load_pretrained, resolve_device, resolve_dtype

    resolved_device = resolve_device(device)
    loaded, tokenizer, name = load_pretrained(
        model, resolved_device, resolve_dtype(dtype, resolved_device), progress=progress
    )
    return Engine(loaded, tokenizer, name=name, progress=progress)


__all__ = [
    "Answer", "Engine", "InputError", "KvlabError", "MethodInfo", "ModelError", "Recipe",
    "RecipeError", "Session", "Stats", "compress", "load", "methods", "parse_recipe",
    "position", "prefill", "quantize", "retrieve",
]

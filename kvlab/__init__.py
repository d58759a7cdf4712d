"""kvlab: efficient long-context inference on Hugging Face transformers, stage by stage.

The KV cache's life is the architecture: ``kvlab.position``, ``kvlab.prefill``,
``kvlab.compress``, ``kvlab.retrieve`` and ``kvlab.reuse`` hold the methods of each stage;
``kvlab.engine`` holds the shared mechanics they plug into.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # kvlab never downloads, whatever the environment says:
os.environ["TRANSFORMERS_OFFLINE"] = "1"  # a missing file fails fast instead
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from kvlab import compress, position, prefill, quantize, retrieve  # noqa: E402  (registers the methods)
from kvlab.engine.engine import Answer, Engine, Stats  # noqa: E402
from kvlab.errors import InputError, KvlabError, ModelError, RecipeError  # noqa: E402
from kvlab.recipe import Recipe, parse_recipe  # noqa: E402
from kvlab.registry import MethodInfo, methods  # noqa: E402
from kvlab.reuse import Session  # noqa: E402

__version__ = "0.1.0"


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
    from kvlab.engine.loading import load_pretrained, resolve_device, resolve_dtype

    resolved_device = resolve_device(device)
    loaded, tokenizer, name = load_pretrained(model, resolved_device, resolve_dtype(dtype, resolved_device))
    return Engine(loaded, tokenizer, name=name, progress=progress)


__all__ = [
    "Answer", "Engine", "InputError", "KvlabError", "MethodInfo", "ModelError", "Recipe",
    "RecipeError", "Session", "Stats", "compress", "load", "methods", "parse_recipe",
    "position", "prefill", "quantize", "retrieve",
]

"""Stage 5, reuse: encode a shared context once, serve many turns and requests from it.

Sessions (:mod:`kvlab.reuse.session`) encode one context; APE (:mod:`kvlab.reuse.ape`, the
stage's registered method) joins documents encoded apart (:mod:`kvlab.reuse.documents`).
The session classes are imported on first use: the recipe imports this package's contract
(:mod:`kvlab.reuse.base`), below the engine the sessions run on.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvlab.reuse.ape import Ape

if TYPE_CHECKING:
    from kvlab.reuse.documents import Documents
    from kvlab.reuse.session import MODES, Session

_LAZY = {"MODES": "kvlab.reuse.session", "Session": "kvlab.reuse.session", "Documents": "kvlab.reuse.documents"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kvlab.reuse' has no attribute {name!r}")


__all__ = ["Ape", "Documents", "MODES", "Session"]

"""Stage 5, reuse: encode a shared context once, serve many turns and requests from it."""

from kvlab.reuse.session import MODES, Session

__all__ = ["MODES", "Session"]

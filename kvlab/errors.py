"""Errors kvlab reports to its users.

Every error a user can cause (a bad recipe, a missing model, a prompt that does not fit) is a
:class:`KvlabError` whose message names the bad value and, where there is a closed set, the
allowed ones. The CLI prints these messages without a traceback.
"""

from __future__ import annotations


class KvlabError(Exception):
    """Base class of the errors kvlab raises for bad input or a missing resource."""


class RecipeError(KvlabError, ValueError):
    """A recipe string or a method parameter is invalid."""


class ModelError(KvlabError):
    """A model cannot be found, loaded, or is of an unsupported architecture."""


class InputError(KvlabError, ValueError):
    """A prompt, context or generation setting is invalid (too long, empty, out of range)."""


class StoreError(KvlabError):
    """A results store cannot be opened, read or written (held by another process, corrupt,
    on a read-only directory); the message names the file and what to do."""

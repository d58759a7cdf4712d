"""API keys (``--api-key-file``): one key per line, optionally followed by a tenant name.

::

    sk-alice-0f3a  alice
    sk-bob-77c1    bob
    sk-ci-12ab             # no name: the tenant is "key3" (its line number)

Blank lines and ``#`` comments are skipped. Every ``/v1`` request must then send
``Authorization: Bearer KEY``; the key's tenant namespaces the contexts the server stores, so
one tenant's context is never matched by another's prompt. Keys are compared in constant time.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from kvlab.errors import InputError

ANONYMOUS = "-"
"""The tenant of every request when the server runs without keys."""


def load_api_keys(path: str | Path) -> dict[str, str]:
    """Key -> tenant from ``path``; an :class:`InputError` naming the file and line otherwise."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--api-key-file {str(path)!r}: cannot read it ({exc})") from None
    keys: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) > 2:
            raise InputError(
                f"--api-key-file {str(path)!r} line {number}: expected 'KEY' or 'KEY TENANT', "
                f"got {len(words)} words"
            )
        key, tenant = words[0], (words[1] if len(words) == 2 else f"key{number}")
        if key in keys:
            raise InputError(f"--api-key-file {str(path)!r} line {number}: this key is listed twice")
        keys[key] = tenant
    if not keys:
        raise InputError(f"--api-key-file {str(path)!r} holds no key (one key per line, optional tenant name)")
    return keys


def tenant_of(keys: dict[str, str] | None, authorization: str | None) -> str | None:
    """The tenant of the ``Authorization`` header's bearer key; None for a missing or wrong
    key. Without keys every request is :data:`ANONYMOUS`."""
    if keys is None:
        return ANONYMOUS
    if not authorization or not authorization.startswith("Bearer "):
        return None
    given = authorization[len("Bearer "):].strip().encode()
    found = None
    for key, tenant in keys.items():  # no early exit: the time does not tell which key is near
        if hmac.compare_digest(key.encode(), given):
            found = tenant
    return found


__all__ = ["ANONYMOUS", "load_api_keys", "tenant_of"]

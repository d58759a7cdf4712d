"""Context lengths as users write them (``4k``) and as messages show them."""

from __future__ import annotations

import re

from kvlab.errors import InputError


def parse_length(text: str) -> int:
    """``4k`` -> 4096, ``128k`` -> 131072, ``1500`` -> 1500."""
    match = re.fullmatch(r"\s*(\d+)\s*([kK]?)\s*", text)
    if not match:
        raise InputError(f"length {text!r}: write a token count such as 1500, 1k or 4k")
    value = int(match.group(1))
    return value * 1024 if match.group(2) else value


def format_length(tokens: int) -> str:
    """``4096`` -> ``4k``, ``1500`` -> ``1500`` (the inverse of :func:`parse_length`)."""
    return f"{tokens // 1024}k" if tokens % 1024 == 0 else str(tokens)


def describe_length(tokens: int) -> str:
    """``4096`` -> ``4096 (4k)``, ``1500`` -> ``1500``: a length as messages name it."""
    short = format_length(tokens)
    return str(tokens) if short == str(tokens) else f"{tokens} ({short})"


__all__ = ["describe_length", "format_length", "parse_length"]

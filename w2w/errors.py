"""Errors raised for bad user input, importable from every layer (it imports nothing of w2w)."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input, reported before any work starts; the message names the option and the fix."""


def divisors(n: int) -> list[int]:
    """The shard counts that split n heads evenly (used in the advice of shard errors)."""
    return [d for d in range(1, n + 1) if n % d == 0]

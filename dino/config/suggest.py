"""The "did you mean ...?" of every message: the nearest valid name for a misspelt key or value.

One helper for the whole project (train, eval, viz and sweep files) so that every typo is answered
the same way.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def nearest(word: str, options: Iterable[str]) -> str | None:
    """The valid name closest to `word` (difflib's ratio >= 0.6), or None when nothing is close."""
    match = difflib.get_close_matches(str(word), sorted(options), n=1)
    return match[0] if match else None


def did_you_mean(word: str, options: Iterable[str]) -> str:
    """` (did you mean X?)`, to append to a message; empty when no option is close."""
    near = nearest(word, options)
    return f" (did you mean {near}?)" if near else ""


def unknown_key(key: str, options: Iterable[str]) -> str:
    """`unknown config key 'optim.epohcs'; did you mean optim.epochs?` (the message of train, eval,
    viz and a sweep's base overrides)."""
    near = nearest(key, options)
    return f"unknown config key '{key}'" + (f"; did you mean {near}?" if near else "")


def not_allowed(key: str, value: object, allowed: Iterable[str]) -> str | None:
    """`train.precision='bf17' is not allowed (did you mean bf16?); choose one of: ...`, or None when
    the value is one of `allowed`."""
    allowed = list(allowed)
    if value in allowed:
        return None
    return f"{key}={value!r} is not allowed{did_you_mean(str(value), allowed)}; choose one of: {', '.join(allowed)}"

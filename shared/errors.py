"""User-facing errors.

Anything a user can cause (bad config, missing file, unknown model) raises :class:`ModaltuneError` with a message
that names the item and the fix. The CLI prints it as one line instead of a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class ModaltuneError(Exception):
    """An error caused by input or environment, with a message meant for the user."""


class ConfigError(ModaltuneError):
    """The configuration is invalid (unknown key, wrong type, bad value)."""


class DataError(ModaltuneError):
    """Input data cannot be used (missing file, malformed line, empty split)."""


def suggest(name: str, known: Iterable[str], n: int = 3) -> str:
    """Return a ``did you mean ...?`` hint for ``name`` among ``known``, or an empty string.

    Example:
        >>> suggest("encodr", ["encoder", "projector", "llm"])
        " (did you mean 'encoder'?)"
    """
    close = difflib.get_close_matches(name, list(known), n=n, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"

"""The one shell-quoting helper every builder in slurm_ray goes through.

Nothing else in the package may paste a value into shell text or an
``#SBATCH`` line; a single helper keeps the hostile-value tests meaningful.
"""

from __future__ import annotations

import shlex
from collections.abc import Iterable

__all__ = ["quote", "quote_args"]


def quote(value: object) -> str:
    """Quote one value so that a POSIX shell reads it back as exactly one word.

    ``str(value)`` is passed through :func:`shlex.quote`: safe words are left
    as they are, everything else is single-quoted (``'`` written as ``'"'"'``).

    :param value: anything with a meaningful ``str()``: str, int, float, a Path…
    :raises TypeError: for ``None`` and ``bytes`` (``"None"`` or ``"b'…'"`` would
        be quoted without complaint and is always a bug in the caller).
    :raises ValueError: if the text holds a NUL byte, which no shell word,
        argv entry or environment value can carry.
    """
    if value is None or isinstance(value, bytes | bytearray):
        raise TypeError(f"refusing to shell-quote {type(value).__name__} value {value!r}")
    text = str(value)
    if "\x00" in text:
        raise ValueError(f"value contains a NUL byte: {text!r}")
    return shlex.quote(text)


def quote_args(args: Iterable[object]) -> str:
    """The words of one command line, each quoted (:func:`quote`), joined by spaces."""
    return " ".join(quote(arg) for arg in args)

"""quote()/quote_args(): what a real shell reads back is exactly the value."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from slurm_ray.utils.quoting import quote, quote_args

HOSTILE = [
    "a 0",
    'a"=0"',
    "a'; echo foo",
    "a\n0",
    "$(echo PWNED)",
    "`echo PWNED`",
    "; echo PWNED",
    "a\\b",
    "it's",
    "-n",
    "*",
    "~",
    "",
    "ü €",
    "tab\there",
]


def shell_words(text: str) -> list[str]:
    """Let bash split `text` into words and print each NUL-terminated."""
    out = subprocess.run(
        ["bash", "-c", f"printf '%s\\0' {text}"], capture_output=True, check=True
    ).stdout
    return out.decode().split("\0")[:-1]


@pytest.mark.parametrize("value", HOSTILE)
def test_quote_round_trips_through_bash(value: str) -> None:
    assert shell_words(quote(value)) == [value]


def test_quote_args_keeps_word_boundaries() -> None:
    assert shell_words(quote_args(HOSTILE)) == HOSTILE


def test_quote_leaves_safe_words_readable() -> None:
    assert quote("slurm-%j.out") == "slurm-%j.out"
    assert quote(123) == "123"
    assert quote(Path("/a b")) == "'/a b'"


def test_quote_rejects_nul() -> None:
    with pytest.raises(ValueError, match="NUL"):
        quote("a\x00b")


@pytest.mark.parametrize("value", [None, b"bytes"])
def test_quote_rejects_values_whose_str_is_a_bug(value: object) -> None:
    with pytest.raises(TypeError):
        quote(value)

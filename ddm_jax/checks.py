"""Argument checks shared by every layer, and the one error they raise.

Functions and modules name their own arguments (`steps=0: expected an integer >= 1`); the
builder layer (`ddm_jax.training.builders`) catches an `ArgumentError` and raises it again
under the config field the argument came from (`model.T=-1: expected ...`). Nothing here
knows about configs.
"""

import contextlib
import difflib
import json
from collections.abc import Collection
from typing import Any

import numpy as np

PyTree = Any  # a nested structure of arrays (dicts, lists, tuples, dataclasses registered with JAX)


class ArgumentError(ValueError):
    """A bad argument: its name, its value and what was expected, in one message."""

    def __init__(self, argument: str, value: Any, expected: str):
        self.argument, self.value, self.expected = argument, value, expected
        super().__init__(f"{argument}={value!r}: expected {expected}")

    def renamed(self, argument: str) -> "ArgumentError":
        """The same error under another name (e.g. the config field the argument came from)."""
        return ArgumentError(argument, self.value, self.expected)


def check(ok: bool, argument: str, value: Any, expected: str) -> None:
    """Raises ArgumentError(argument, value, expected) unless `ok`."""
    if not ok:
        raise ArgumentError(argument, value, expected)


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """A Python or NumPy integer or float, not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def check_int(argument: str, value: Any, minimum: int | None = None, maximum: int | None = None) -> None:
    """An integer in [minimum, maximum] (either bound may be None)."""
    if minimum is not None and maximum is not None:
        expected = f"an integer in [{minimum}, {maximum}]"
    elif minimum is not None:
        expected = f"an integer >= {minimum}"
    elif maximum is not None:
        expected = f"an integer <= {maximum}"
    else:
        expected = "an integer"
    check(
        is_int(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum),
        argument,
        value,
        expected,
    )


def check_choice(argument: str, value: Any, choices: Collection) -> None:
    """One of `choices` (a tuple, or a registry dict whose keys are the choices)."""
    check(value in choices, argument, value, f"one of {tuple(choices)}")


def check_interval(
    argument: str, value: Any, low: float, high: float, *, closed_low: bool = True, closed_high: bool = False
) -> None:
    """A real number in the interval from low to high ([low, high) by default)."""
    inside = (
        is_real(value)
        and (value >= low if closed_low else value > low)
        and (value <= high if closed_high else value < high)
    )
    interval = f"{'[' if closed_low else '('}{low}, {high}{']' if closed_high else ')'}"
    check(inside, argument, value, f"a number in {interval}")


def as_json(mapping, argument: str = "value") -> dict:
    """`mapping` as it reads back from JSON (tuples become lists, keys sorted), so what is stored (a
    fingerprint, an architecture) compares equal to what is read. A leaf JSON cannot hold raises
    ArgumentError naming `argument` (the mapping's name)."""

    def refuse(value):
        raise ArgumentError(argument, value, "only JSON values (str, int, float, bool, None, list, dict)")

    return json.loads(json.dumps(dict(mapping), default=refuse, sort_keys=True))


@contextlib.contextmanager
def config_fields(prefix: str = "", **renames: str):
    """Re-raises an ArgumentError of the block as the config field (or flag) it came from:
    renames[argument] when given, else `prefix.argument` (the argument itself without a prefix)."""
    try:
        yield
    except ArgumentError as error:
        default = f"{prefix}.{error.argument}" if prefix else error.argument
        raise error.renamed(renames.get(error.argument, default)) from None


def nearest_fields(name: str, fields) -> str:
    """' (nearest: a, b)' for the fields closest to a misspelt `name`, or ''."""
    close = difflib.get_close_matches(name, list(fields), n=3, cutoff=0.5)
    return f" (nearest: {', '.join(close)})" if close else ""

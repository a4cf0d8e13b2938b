"""The one set of validation helpers: every check names its owner and field, the valid range
and the value it got, and raises an `errors` class the gateway maps to a gRPC status."""

from __future__ import annotations

import math
from typing import Any

from pagedserve.errors import InvalidArgument, InvalidType


def check_field(owner: str, name: str, ok: bool, rule: str, value: Any,
                error: type[InvalidArgument] = InvalidArgument) -> None:
    """Raise `error` saying `owner.name must be <rule>, got <value>` unless `ok`."""
    if not ok:
        raise error(f"{owner}.{name} must be {rule}, got {value!r}", field=f"{owner}.{name}")


def is_int(value: Any) -> bool:
    """An integer that is not a bool (True is an int to Python, never to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_finite_number(value: Any) -> bool:
    return is_number(value) and math.isfinite(value)


def check_text(name: str, value: str) -> None:
    """Raise InvalidArgument naming the field `name` unless `value` is valid Unicode text: a
    lone surrogate (JSON can carry "\\ud800") encodes to no UTF-8, for a tokenizer or the
    wire."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidArgument(f"{name} is not valid Unicode text ({error.reason} at position "
                              f"{error.start}); remove lone surrogates", field=name) from None


def check_type(name: str, value: Any, accepted: str, ok: bool) -> None:
    """Raise InvalidType naming the argument `name` and the types accepted unless `ok`."""
    if not ok:
        raise InvalidType(f"{name} must be {accepted}, got {type(value).__name__}")

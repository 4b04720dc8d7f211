"""The one exception type that means "the user can fix this", and its helpers."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """Bad input: printed as one line, exit code 2, never a traceback."""

    exit_code = 2


def did_you_mean(value: str, options: Iterable[str]) -> str:
    """A ' (did you mean 'x'?)' suffix for a misspelt choice, or '' when nothing is close."""
    close = difflib.get_close_matches(str(value), [str(o) for o in options], n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def unknown_choice(kind: str, value: str, options: Iterable[str]) -> UserError:
    """The standard error for a name that is not in a registry."""
    options = sorted(options)
    return UserError(f"unknown {kind} '{value}'{did_you_mean(value, options)}; available: {', '.join(options)}")

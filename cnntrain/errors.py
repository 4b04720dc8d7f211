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


def os_reason(e: OSError) -> str:
    """What went wrong with a path, in words a user acts on (not "[Errno 17] File exists")."""
    import errno

    reasons = {
        errno.EEXIST: "a file is in the way (a folder is needed there)",
        errno.ENOTDIR: "a file is in the way (a folder is needed there)",
        errno.EISDIR: "it is a folder (a file name is needed)",
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.ENOENT: "no such file or folder",
        errno.EROFS: "the file system is read-only",
        errno.ENOSPC: "no space left on the device",
        errno.ENAMETOOLONG: "the name is too long",
    }
    return reasons.get(e.errno or -1) or (e.strerror or str(e)).strip().lower() or type(e).__name__


def path_error(e: OSError, key: str, value: object, doing: str = "cannot use") -> UserError:
    """The one-line error for an OSError about a path the user gave as key=value: names the key, the value
    and the file that failed (which may lie inside the folder given)."""
    failed = e.filename if e.filename is not None else value
    return UserError(f"{key}={value}: {doing} {failed}: {os_reason(e)}")


def user_path_error(e: OSError, args: Iterable[str], positional: str = "dir") -> UserError | None:
    """An OSError (raised anywhere in a command) about a path given on the command line -> the one-line
    error naming its key; None when the failed path is none of the user's (then it is a bug, not bad input).
    A path counts when it is the value of an argument or lies under it; the longest such value wins.
    An argument without '=' is the command's positional one (`report DIR`), named `positional`."""
    import os

    failed = [os.fsdecode(f) for f in (e.filename, getattr(e, "filename2", None)) if f is not None]
    best: tuple[int, str, str] | None = None
    for arg in args:
        if arg.startswith("-"):
            continue
        key, eq, value = arg.partition("=")
        if not eq:
            key, value = positional, arg
        key, value = key.lstrip("+~"), value.strip("'\"")
        if not key or not value:
            continue
        mine = os.path.abspath(os.path.expanduser(value))
        for f in failed:
            path = os.path.abspath(os.path.expanduser(f))
            under = path == mine or path.startswith(mine.rstrip(os.sep) + os.sep)
            if under and (best is None or len(mine) > best[0]):
                best = (len(mine), key, value)
    return None if best is None else path_error(e, best[1], best[2])

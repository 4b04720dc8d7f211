"""Checks of `cnntrain fit`'s overrides before Hydra runs anything: a value list without --multirun, and every
job of a sweep validated before the first one trains (a bad value in the last job would otherwise be found
after the others had trained, in Hydra's words)."""

from __future__ import annotations

import shlex
from typing import Any

from cnntrain.errors import UserError

_BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


def check_overrides(args: list[str], typed: list[str]) -> None:
    """One line that names --multirun for a sweep typed without it (the command as typed, with the flag);
    for a sweep, every job's config validated at once, each bad value on a line of its own."""
    from cnntrain.cli.resume import overrides_only

    overrides = overrides_only(args)
    parsed = _parse(overrides)
    if parsed is None:
        return  # Hydra reports the syntax error itself, in the words cli/fit.py turns into one line
    multirun = "-m" in args or "--multirun" in args
    swept = [o for o in parsed if o.is_sweep_override()]
    if not multirun:
        if swept:
            first = next(text for text, o in zip(overrides, parsed, strict=True) if o.is_sweep_override())
            raise UserError(
                f"{first} gives several values: to train one run per value add --multirun "
                f"({shlex.join(['cnntrain', 'fit', '--multirun', *typed])}); for a list value write "
                f"{first.split('=', 1)[0]}=[...]"
            )
        return
    if swept:
        _check_jobs(overrides, parsed)


def _parse(overrides: list[str]) -> list[Any] | None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return None


def _check_jobs(overrides: list[str], parsed: list[Any]) -> None:
    """Compose and validate each job of a grid sweep (the basic sweeper's; a search such as Optuna's
    draws its values as it goes, and each trial is checked when it starts)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    from cnntrain.config import validate
    from cnntrain.config.compose import compose_fit

    fixed = [
        text
        for text, o in zip(overrides, parsed, strict=True)
        if not o.is_sweep_override() and o.key_or_group != "resume"
    ]
    base = compose_fit(fixed, return_hydra_config=True)
    if str(base.hydra.sweeper.get("_target_")) != _BASIC_SWEEPER:
        return
    task = [
        text
        for text, o in zip(overrides, parsed, strict=True)
        if not o.is_hydra_override() and o.key_or_group != "resume"
    ]
    jobs = [job for batch in BasicSweeper.split_arguments(_parse(task) or [], None) for job in batch]
    swept_keys = {o.key_or_group for o in parsed if o.is_sweep_override()}
    bad: dict[str, list[str]] = {}
    for job in jobs:
        try:
            validate(compose_fit(list(job)))
        except UserError as e:
            label = " ".join(o for o in job if o.split("=", 1)[0].lstrip("+~") in swept_keys)
            bad.setdefault(str(e), []).append(label)
    if not bad:
        return
    lines = [
        f"{message}, in {len(labels)} job(s): {labels[0]}{', ...' if len(labels) > 1 else ''}"
        for message, labels in bad.items()
    ]
    if len(lines) == 1:
        raise UserError(f"{lines[0]}; nothing of the sweep ({len(jobs)} jobs) was trained")
    count = sum(len(labels) for labels in bad.values())
    raise UserError(
        "\n".join(
            [
                f"{count} of the sweep's {len(jobs)} jobs have bad values; nothing was trained:",
                *(f"  {line}" for line in lines),
            ]
        )
    )

"""`resume=<run>` and `resume=auto`: turned into the run's own overrides plus the new ones, before Hydra runs."""

from __future__ import annotations

from pathlib import Path

from cnntrain.config.compose import compose_fit
from cnntrain.errors import UserError
from cnntrain.io.files import RunDir
from cnntrain.sweep import jobs as sweep


def expand_resume(args: list[str]) -> list[str]:
    """`resume=<run dir>`: compose the run's own overrides again, then the new ones, in its directory."""
    resume = next((a.split("=", 1)[1] for a in args if a.startswith("resume=")), None)
    if resume == "auto":
        return _expand_auto_resume(args)
    if resume in (None, "", "null"):
        return args
    from cnntrain.engine.checkpoint import find_checkpoint

    path = find_checkpoint(resume)
    run = RunDir.of(path)
    run_dir, saved = run.path, run.overrides
    if not saved.is_file():
        raise UserError(
            f"{run_dir} is not a cnntrain run directory (no .hydra/overrides.yaml); "
            "resume takes a run directory or its checkpoints/last.pt"
        )
    from omegaconf import OmegaConf

    def key(override: str) -> str:
        return override.split("=", 1)[0].lstrip("+~")

    merged: dict[str, str] = {}
    for override in [*OmegaConf.load(saved), *args]:
        override = str(override)
        if key(override) != "resume":
            merged[key(override)] = override
    _check_same_run(run_dir, path, list(merged.values()))
    return [*merged.values(), f"resume={path}", f"hydra.run.dir={run_dir}"]


def _check_same_run(run_dir: Path, path: Path, overrides: list[str]) -> None:
    """Refuse a resume whose overrides change what the run is (its dataset, model, recipe), before Hydra
    touches the run directory; `engine.checkpoint.restore` checks the same against the checkpoint, and the data
    against their recorded fingerprint."""
    recorded = RunDir(run_dir).config
    if not recorded.is_file():
        return  # nothing to compare here; restore compares with the checkpoint's config
    from omegaconf import OmegaConf

    from cnntrain.config.identity import check_resume

    task = [o for o in overrides_only(overrides) if not o.lstrip("+~").startswith("hydra")]
    requested = OmegaConf.to_container(compose_fit([*task, f"resume={path}"]), resolve=True)
    check_resume(
        OmegaConf.to_container(OmegaConf.load(recorded), resolve=True),
        requested,
        str(run_dir),
        sweep.weights_command(path, task),
        sweep.new_run_command(task),
    )


# Hydra flags that take a value: the token after them is not an override.
_VALUE_FLAGS = {
    "--cfg",
    "-c",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
}


def overrides_only(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in _VALUE_FLAGS:
            skip = True
        elif not a.startswith("-"):
            out.append(a)
    return out


def _expand_auto_resume(args: list[str]) -> list[str]:
    """`resume=auto`: continue the newest unfinished run of this experiment, or start fresh.

    A single run looks in runs/<name>/ for a run with checkpoints/last.pt that did not complete. A sweep
    reuses the newest earlier sweep started with the same overrides, and each job then finds its own
    earlier run (cnntrain.sweep.jobs.prepare_job): finished jobs are skipped, unfinished ones continue.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = overrides_only(args)
    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [
        text
        for text, o in zip(overrides, parsed, strict=True)
        if not o.is_sweep_override() and o.key_or_group != "resume"
    ]
    # Compose without running to learn where this experiment's runs live (runs/<name>/...).
    cfg = compose_fit(fixed, return_hydra_config=True)
    if "-m" in args or "--multirun" in args:
        if any(o.key_or_group == "hydra.sweep.dir" for o in parsed):
            return args  # the sweep directory is given: its jobs find themselves there
        task = [text for text, o in zip(overrides, parsed, strict=True) if not o.is_hydra_override()]
        previous = sweep.matching_sweep_dir(Path(str(cfg.hydra.sweep.dir)).parent, task)
        if previous is None:
            return args
        print(f"resume=auto: continuing the sweep in {previous}", flush=True)
        return [*args, f"hydra.sweep.dir={previous}"]
    base = Path(str(cfg.hydra.run.dir)).parent
    run = sweep.newest_unfinished_run(base)
    rest = [a for a in args if not a.startswith("resume=")]
    if run is None:
        print(f"resume=auto: no unfinished run in {base}; starting a new one", flush=True)
        return rest
    print(f"resume=auto: continuing {run}", flush=True)
    return expand_resume([*rest, f"resume={run}"])

"""cnntrain's Optuna sweeper (`hydra/sweeper=optuna`, and the presets optuna_study and experiment=tune), on
Hydra's Sweeper interface with Optuna's ask/tell API.

hydra-optuna-sweeper stopped at optuna < 3; this one works with current Optuna. It asks the study for a batch
of trials, runs them as jobs through whatever launcher is configured, and tells the study each job's result:
the value `fit` returned, "pruned" when the job's pruner stopped it (sweep.pruner, see cnntrain.sweep.pruning),
or a failure. Trials live in the study's RDB storage, so several sweep processes given the same storage and
study name share one study (Optuna's own distributed mode) and a study continues where it stopped.

The search space is written as before: `hydra.sweeper.params` (or sweep overrides on the command line) in
Hydra's syntax: choice(a, b), range(lo, hi[, step]), interval(lo, hi), tag(log, interval(lo, hi)),
tag(int, interval(lo, hi)).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from cnntrain.errors import UserError
from cnntrain.sweep.pruning import PRUNED, open_storage

# Under hydra_plugins: Hydra's logging config shows these lines with its own (configs/hydra/hydra_logging).
log = logging.getLogger("hydra_plugins.cnntrain_optuna_sweeper")


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise UserError(
            "hydra/sweeper=optuna needs Optuna, which is not installed: pip install 'cnntrain[optuna]'"
        ) from None
    return optuna


def distribution(override: Override) -> Any:
    """A sweep override (choice, range, interval, with tag(log, ...)) as an Optuna distribution."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    value = override.value()
    key = override.get_key_element()
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution(list(value.list))
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        if all(isinstance(v, int) for v in (start, stop, step)) and step > 0:
            return IntDistribution(int(start), int(stop) - 1, step=int(step))  # range() excludes its end
        return CategoricalDistribution(list(override.sweep_iterator()))
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if "int" in value.tags:  # Hydra reads interval(1, 4) as floats; tag(int, ...) asks for integers
            return IntDistribution(int(value.start), int(value.end), log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise UserError(f"{key}: cannot search over {override.input_line}; use choice(...), range(...) or interval(...)")


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        sampler: Any,
        direction: Any,
        storage: str | None,
        study_name: str | None,
        n_trials: int,
        n_jobs: int = 1,
        max_failure_rate: float = 0.0,
        params: dict[str, str] | None = None,
    ) -> None:
        self.sampler_config = sampler
        self.direction = str(direction)
        self.storage, self.study_name = storage, study_name
        self.n_trials, self.n_jobs = int(n_trials), max(1, int(n_jobs))
        self.max_failure_rate = float(max_failure_rate)
        self.params = dict(params or {})
        self.config: DictConfig | None = None
        self.launcher: Any = None
        self.hydra_context: HydraContext | None = None
        self.exhausted = False  # the sampler has nothing left to propose (a finished grid)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def _space(self, arguments: list[str]) -> tuple[dict[str, Any], list[str]]:
        """(key -> distribution, fixed overrides) of hydra.sweeper.params and the command line (which wins)."""
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader if self.hydra_context else None)
        texts = [f"{k}={v}" for k, v in self.params.items()]
        overrides = parser.parse_overrides(texts) + parser.parse_overrides(list(arguments))
        space: dict[str, Any] = {}
        fixed: dict[str, str] = {}
        for o in overrides:
            key = o.get_key_element()
            if o.is_sweep_override():
                fixed.pop(key, None)
                space[key] = distribution(o)
            else:
                space.pop(key, None)
                fixed[key] = o.input_line
        if "trainer.fold" in space:
            raise UserError(
                "trainer.folds runs its folds as the jobs of a plain sweep, not as an Optuna search "
                "dimension; tune first, then cross-validate the best trial with trainer.folds=K"
            )
        return space, list(fixed.values())

    def _study(self, optuna: Any, space: dict[str, Any]) -> Any:
        import functools

        from hydra.utils import instantiate

        # Hydra instantiates the sweeper's nested nodes with it: the sampler usually arrives built.
        sampler = self.sampler_config
        if isinstance(sampler, (DictConfig, dict)):
            sampler = instantiate(sampler)
        if isinstance(sampler, functools.partial):  # GridSampler: built from the search space, all choices
            grid = {k: list(d.choices) for k, d in space.items() if hasattr(d, "choices")}
            if len(grid) != len(space):
                raise UserError("hydra/sweeper/sampler=grid searches choice(...) or range(...) values only")
            sampler = sampler(search_space=grid)
        return optuna.create_study(
            study_name=self.study_name,
            storage=open_storage(self.storage),
            sampler=sampler,
            direction=self.direction,
            load_if_exists=True,
        )

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None
        optuna = _import_optuna()
        space, fixed = self._space(arguments)
        study = self._study(optuna, space)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        pruner = OmegaConf.select(self.config, "sweep.pruner", default="none")
        log.info(
            f"Study {study.study_name}: {self.direction}, {len(study.trials)} trials stored, {self.n_trials} to run"
            f"{f', {pruner} pruner' if pruner != 'none' else ''}; storage {self.storage}"
        )
        record = (
            [f"sweep.storage={_quoted(self.storage)}", f"sweep.study={_quoted(study.study_name)}"]
            if self.storage
            else []
        )
        done = 0
        returns = []
        while done < self.n_trials and not self.exhausted:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, self.n_trials - done))]
            batch = [
                [*fixed, *(f"{k}={_literal(v)}" for k, v in t.params.items()), *record, f"sweep.trial={t.number}"]
                for t in trials
            ]
            self.validate_batch_is_legal(batch)
            results = self._launch(batch, [t.number for t in trials])
            failures = self._tell(optuna, study, trials, results)
            returns.append(results)
            done += len(trials)
            if failures and failures / len(trials) > self.max_failure_rate:
                for r in results:
                    _ = r.return_value  # the first failed job's own error, as any sweep reports it
        self._results(study, sweep_dir)
        return returns

    def _launch(self, batch: list[list[str]], numbers: list[int]) -> Sequence[Any]:
        """Job numbers are trial numbers (job directories N_... match the study), so a batch whose trials are
        not consecutive (another process asked in between) goes job by job."""
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            return self.launcher.launch(batch, initial_job_idx=numbers[0])
        return [
            r
            for overrides, n in zip(batch, numbers, strict=True)
            for r in self.launcher.launch([overrides], initial_job_idx=n)
        ]

    def _tell(self, optuna: Any, study: Any, trials: list[Any], results: Sequence[Any]) -> int:
        from hydra.core.utils import JobStatus

        failures = 0
        for trial, result in zip(trials, results, strict=True):
            value = result._return_value if result.status == JobStatus.COMPLETED else None
            try:
                if value == PRUNED:
                    study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                elif isinstance(value, (int, float)) and math.isfinite(value):
                    study.tell(trial, float(value))
                else:
                    failures += 1
                    study.tell(trial, state=optuna.trial.TrialState.FAIL)
            except RuntimeError as e:
                # GridSampler calls study.stop() once its grid is done, which Optuna allows only inside
                # optimize(); the trial's result is stored by then (Optuna stores it in a finally).
                if "Study.stop" not in str(e):
                    raise
                self.exhausted = True
        return failures

    def _results(self, study: Any, sweep_dir: Path) -> None:
        states = [t.state.name.lower() for t in study.trials]
        counts = ", ".join(f"{states.count(s)} {s}" for s in ("complete", "pruned", "fail", "running") if s in states)
        try:
            best = study.best_trial
        except ValueError:  # no trial completed
            log.info(f"Study {study.study_name}: no trial completed ({counts})")
            return
        log.info(f"Best parameters: {best.params}")
        log.info(f"Best value: {best.value}")
        log.info(f"Trials in the study: {counts}")
        OmegaConf.save(
            OmegaConf.create(
                {
                    "name": "optuna",
                    "best_params": best.params,
                    "best_value": best.value,
                    "trials": {s: states.count(s) for s in set(states)},
                }
            ),
            sweep_dir / "optimization_results.yaml",
        )


def _literal(value: Any) -> str:
    """A sampled value as an override value Hydra reads back as the same value."""
    if isinstance(value, str):
        return value
    return repr(value) if isinstance(value, float) else str(value)


def _quoted(text: str) -> str:
    """A path or name as an override value: quoted when it holds what Hydra's grammar reads (a comma, space...)."""
    import re

    if re.fullmatch(r"[\w./:@+-]*", text):
        return text
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"

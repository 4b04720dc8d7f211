"""The job's side of an Optuna trial (sweep.pruner): each epoch's validation metric goes to the trial in the
study's storage, and the study's pruner says whether the trial goes on. The job opens the study itself, so
pruning needs nothing from the sweep process beyond the trial's number, and works under any launcher."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cnntrain.errors import UserError

if TYPE_CHECKING:
    from cnntrain.config import SweepConfig

PRUNED = "pruned"  # what a pruned job returns to the sweeper, and its status in summary.json


class Pruned(Exception):
    """The study's pruner stopped this trial after an epoch."""

    def __init__(self, epoch: int, value: float) -> None:
        super().__init__(f"pruned after epoch {epoch} ({value:.4f})")
        self.epoch, self.value = epoch, value


def open_storage(url: str | None, attempts: int = 10) -> Any:
    """The study's RDB storage. SQLite waits for a lock instead of failing at once (processes that share a
    study write to one file), and two processes creating the same new file's tables at the same moment is
    retried: the loser finds them made."""
    import time

    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    if url is None:
        return None
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs)
        except SQLAlchemyError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    return None


def make_pruner(sweep: SweepConfig, epochs: int) -> Any:
    import optuna

    if sweep.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=sweep.startup_trials, n_warmup_steps=sweep.warmup_epochs)
    if sweep.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(epochs, 1))
    return optuna.pruners.NopPruner()


class TrialReport:
    """One trial of the study, reopened from storage by its number."""

    def __init__(self, sweep: SweepConfig, epochs: int) -> None:
        import optuna

        assert sweep.trial is not None  # open_trial opens the trial of a sweeper's job alone
        study = optuna.load_study(
            study_name=sweep.study, storage=open_storage(sweep.storage), pruner=make_pruner(sweep, epochs)
        )
        # Optuna has no public "trial by number"; the storage maps it, and Trial() wraps a running trial's id.
        trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, sweep.trial)
        self.trial = optuna.trial.Trial(study, trial_id)

    def epoch(self, epoch: int, value: float, last: bool) -> None:
        """Report the epoch's monitored metric; raise Pruned when the pruner says stop (a trial that has
        trained all its epochs is complete, whatever the pruner would say)."""
        self.trial.report(value, epoch)
        if not last and self.trial.should_prune():
            raise Pruned(epoch, value)


def open_trial(sweep: SweepConfig, epochs: int) -> TrialReport | None:
    """The trial a job of the Optuna sweeper reports to (the run trains `epochs`, trainer.epochs); None outside
    one or without a pruner."""
    if sweep.trial is None or sweep.pruner == "none":
        return None
    if sweep.storage is None or sweep.study is None:
        raise UserError(
            "sweep.trial is set by the Optuna sweeper together with sweep.storage and sweep.study; "
            "do not set it by hand"
        )
    return TrialReport(sweep, epochs)

"""Hydra instantiates sweepers only from the hydra_plugins namespace: this is where it finds cnntrain's Optuna
sweeper (`hydra/sweeper=optuna`). The code is cnntrain.cli.optuna_sweeper."""

from cnntrain.cli import optuna_sweeper as _impl


class OptunaSweeper(_impl.OptunaSweeper):
    pass

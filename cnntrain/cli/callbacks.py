"""Hydra callbacks of `cnntrain fit` (named in configs/fit.yaml under hydra.callbacks)."""

from __future__ import annotations

from typing import Any

from hydra.experimental.callback import Callback


class QuietLibraries(Callback):
    """Before a sweep starts: libraries that print on their own go through logging like everything else.

    Optuna puts a handler of its own on its logger, with colour codes even in a pipe; without it, Optuna's
    messages reach the sweep's log (multirun.log) and its warnings the console as one plain line
    (configs/hydra/hydra_logging/cnntrain.yaml).
    """

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from omegaconf import OmegaConf

        sweeper = str(OmegaConf.select(config, "hydra.sweeper._target_", default="") or "")
        if "optuna" in sweeper.lower():
            try:
                import optuna
            except ImportError:  # the sweeper itself says which extra to install
                return

            optuna.logging.disable_default_handler()
            optuna.logging.enable_propagation()

"""The user's config folder on Hydra's search path, ahead of cnntrain's own configs.

A Hydra SearchPathPlugin registered in this process (not discovered from ``hydra_plugins``), so it
applies to `fit`, its sweeps and every config composed without running (lr-find, resume=auto).
Kept in a module of its own because it imports Hydra at the top: the class must be importable by
name for launchers that pickle Hydra's plugin registry into their workers.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath, SearchPathQuery
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin

PROVIDER = "cnntrain-user"


class UserConfigs(SearchPathPlugin):
    """Puts the user's config folder (set by install) before the main (built-in) configs."""

    folder: Path | None = None

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        folder = type(self).folder
        if folder is None:
            return
        if any(e.provider == PROVIDER for e in search_path.get_path()):
            return
        search_path.prepend(provider=PROVIDER, path=f"file://{folder}", anchor=SearchPathQuery(provider="main"))


def install(folder: Path | None) -> None:
    """Put `folder` (None: none) on the search path of the configs Hydra composes from now on."""
    UserConfigs.folder = folder
    Plugins.instance().register(UserConfigs)  # once: a class already registered is not added again

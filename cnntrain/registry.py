"""Name -> builder tables for every pluggable piece: datasets, models, optimizers, schedulers, augmentations.

Each builder registers itself where it is defined::

    @MODELS.register("simple_cnn")
    def simple_cnn(in_channels, image_size, num_classes, width=32, hidden=64, dropout=0.0): ...

so adding one touches one file (an optimizer or schedule also declares its name in its registry below). A config names a builder by its registry key (``model.name``,
``optimizer.name``, ...); an unknown name is one error line that lists the known ones.

Installed packages add models and datasets of their own through Python entry points (groups
``cnntrain.models`` and ``cnntrain.datasets``): each names a callable, used exactly like a
``_target_`` of ``model=custom`` / ``dataset=custom``. They are listed from the packages' metadata
(:meth:`Registry.plugins`) and imported only when a config picks one (:meth:`Registry.load_plugin`).
A built-in name always wins over a plug-in of the same name.

:func:`import_target` turns a dotted path (``mynets.TinyNet``) into the object it names; the
current directory is importable, as with ``python -m``.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnntrain.errors import UserError, did_you_mean, unknown_choice


@dataclass(frozen=True)
class Plugin:
    """One entry point of an installed package: `name = module:attr` in group `cnntrain.<kind>s`."""

    name: str
    value: str  # "package.module:attr"
    package: str  # the distribution that declares it
    version: str
    group: str

    @property
    def label(self) -> str:
        return f"{self.name} (plug-in from {self.package})"


class Registry:
    def __init__(self, kind: str, entry_point_group: str | None = None, names: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        # Declared names (optional): the config's choices for this registry, known without importing the module
        # that registers the builders; a builder of any other name is refused.
        self.names = names
        self._builders: dict[str, Callable[..., Any]] = {}
        self._plugins: dict[str, Plugin] | None = None

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def add(builder: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._builders:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            if self.names and name not in self.names:
                raise ValueError(
                    f"{self.kind} '{name}' is not declared: add it to the names of its registry in cnntrain/registry.py"
                )
            self._builders[name] = builder
            return builder

        return add

    def get(self, name: str) -> Callable[..., Any]:
        try:
            return self._builders[name]
        except KeyError:
            raise unknown_choice(self.kind, name, [*self._builders, *self.plugins()]) from None

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)

    # ------------------------------------------------------------------ installed plug-ins

    def plugins(self) -> dict[str, Plugin]:
        """Entry points of installed packages in this registry's group, by name (metadata only: nothing is imported)."""
        if self.entry_point_group is None:
            return {}
        if self._plugins is None:
            self._plugins = find_plugins(self.entry_point_group)
        return self._plugins

    def plugin(self, name: str) -> Plugin | None:
        """The plug-in of this name, unless a built-in of the same name shadows it (or there is none)."""
        return None if name in self._builders else self.plugins().get(name)

    def load_plugin(self, name: str) -> tuple[Callable[..., Any], Plugin]:
        """Import the plug-in's callable (only now, and only this one)."""
        plugin = self.plugins()[name]
        module, _, attr = plugin.value.partition(":")
        key = f"{self.kind}={name}"
        target = import_target(
            f"{module}.{attr}" if attr else module,
            key,
            hint=f"the entry point of package {plugin.package} names it; reinstall the package",
        )
        if not callable(target):
            raise UserError(
                f"{key}: the plug-in of package {plugin.package} names {plugin.value}, which is a "
                f"{type(target).__name__}, not a class or function"
            )
        return target, plugin

    def refresh(self) -> None:
        """Forget the plug-ins found so far (a package was installed while this process runs)."""
        self._plugins = None


def find_plugins(group: str) -> dict[str, Plugin]:
    """Every entry point of `group` among the installed distributions; the first of a name wins."""
    from importlib import metadata

    found: dict[str, Plugin] = {}
    for ep in metadata.entry_points(group=group):
        if ep.name in found:
            continue
        dist = getattr(ep, "dist", None)
        package = dist.metadata["Name"] if dist is not None else "?"
        version = dist.version if dist is not None else "?"
        found[ep.name] = Plugin(ep.name, ep.value, str(package), str(version), group)
    return dict(sorted(found.items()))


# --------------------------------------------------------------------------- dotted paths


class TargetImportError(UserError):
    """A `_target_` whose module cannot be imported; `module` is the one that is missing."""

    def __init__(self, message: str, module: str) -> None:
        super().__init__(message)
        self.module = module


def _importable_cwd() -> None:
    """The current directory is importable (`python -m` has it on sys.path; the console script does not)."""
    cwd = os.getcwd()
    if not any(p in ("", cwd) or _same(p, cwd) for p in sys.path):
        sys.path.insert(0, cwd)


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def import_target(dotted: str | None, key: str, hint: str | None = None) -> Any:
    """The object a dotted path names: `package.module.Attr` (or `package.module:Attr`).

    Only the named module (and its parents) is imported. A module that cannot be found is one line
    that names it and says how to make it importable; an error raised while importing it is the
    user's code failing, and keeps its traceback.
    """
    if not dotted or not isinstance(dotted, str):
        raise UserError(f"{key} is not set; give the dotted path of a class or function, e.g. {key}=mynets.TinyNet")
    text = dotted.strip()
    if ":" in text:
        module_name, _, attr_path = text.partition(":")
        attrs = [a for a in attr_path.split(".") if a]
    else:
        parts = text.split(".")
        if len(parts) < 2 or not all(p.isidentifier() for p in parts):
            raise UserError(
                f"{key}={dotted} is not a dotted path to a class or function; write module.Name, "
                f"e.g. mynets.TinyNet for class TinyNet in mynets.py"
            )
        module_name, attrs = ".".join(parts[:-1]), [parts[-1]]
    _importable_cwd()
    # The longest importable module prefix: `pkg.mod.Class.method` works too.
    names = module_name.split(".")
    module, missing = None, None
    for i in range(len(names), 0, -1):
        candidate = ".".join(names[:i])
        try:
            module = importlib.import_module(candidate)
        except ModuleNotFoundError as e:
            if e.name is not None and (candidate == e.name or candidate.startswith(e.name + ".")):
                missing = missing or e.name
                continue  # names[i-1] may be a class inside names[:i-1]
            raise UserError(
                f"{key}={dotted}: importing module {candidate} failed: No module named '{e.name}' "
                f"(a module that {candidate} imports); install it"
            ) from None
        attrs = names[i:] + attrs
        break
    if module is None:
        raise TargetImportError(_not_importable(key, dotted, missing or module_name, hint), missing or module_name)
    obj: Any = module
    done = module.__name__
    for attr in attrs:
        if not hasattr(obj, attr):
            if missing is not None and obj is module:  # pkg.sub.Class with no pkg/sub.py
                raise TargetImportError(_not_importable(key, dotted, missing, hint), missing)
            where = getattr(module, "__file__", None) or done
            available = [n for n in dir(obj) if not n.startswith("_")]
            raise UserError(
                f"{key}={dotted}: {done} ({where}) has no attribute '{attr}'{did_you_mean(attr, available)}"
            )
        obj = getattr(obj, attr)
        done = f"{done}.{attr}"
    return obj


def _not_importable(key: str, dotted: str, missing: str, hint: str | None) -> str:
    top = missing.split(".")[0]
    where = hint or (
        f"run cnntrain from the folder that holds {top}.py (or the package folder {top}/), "
        f"or add that folder to PYTHONPATH"
    )
    return f"{key}={dotted}: cannot import module '{missing}' (not in {Path.cwd()} nor on PYTHONPATH); {where}"


DATASETS = Registry("dataset", "cnntrain.datasets")  # (DatasetConfig) -> ImageData
MODELS = Registry("model", "cnntrain.models")  # (in_channels, image_size, num_classes, **model keys) -> nn.Module
# The optimizers and schedules are declared by name: validation (config.CHOICES) checks optimizer.name and
# scheduler.name before torch is imported, and cnntrain/optim.py, which registers their builders, imports torch.
# (param_groups, OptimizerConfig) -> torch.optim.Optimizer
OPTIMIZERS = Registry("optimizer", names=("adam", "adamw", "sgd"))
# (SchedulerConfig, base_lr, steps_per_epoch, epochs) -> lr factor of the step
SCHEDULERS = Registry("scheduler", names=("none", "cosine", "onecycle", "step"))
AUGMENTATIONS = Registry("augmentation")  # (AugmentConfig, num_classes) -> a batch stage, or None when it is off

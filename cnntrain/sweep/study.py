"""The values of an Optuna study that configs/hydra/sweeper/optuna_study.yaml computes with resolvers: its
direction (from trainer.monitor), its storage (an SQLite file, whose folder is made) and its sampler's seed
(new points for a study continued from its storage). `cnntrain fit` registers them (cnntrain.cli.fit) before
Hydra composes the sweeper's config.
"""

from __future__ import annotations

from pathlib import Path


def register_resolvers() -> None:
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("cnntrain_direction"):
        OmegaConf.register_new_resolver("cnntrain_direction", direction)
    if not OmegaConf.has_resolver("cnntrain_sqlite"):
        OmegaConf.register_new_resolver("cnntrain_sqlite", sqlite_url)
    if not OmegaConf.has_resolver("cnntrain_study_seed"):
        # The Optuna sampler's seed: a continued study must not propose its first trials again.
        OmegaConf.register_new_resolver("cnntrain_study_seed", study_seed)


def direction(monitor: str) -> str:
    """Optuna's direction follows trainer.monitor: accuracy and mAP up, loss down."""
    return "minimize" if "loss" in str(monitor) else "maximize"


def sqlite_url(path: str) -> str:
    """An SQLite URL for an Optuna study file; its folder is created (SQLite will not)."""
    file = Path(path).expanduser().resolve()
    file.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{file}"


def study_seed(seed: int, storage: str, study_name: str) -> int:
    """The sampler seed of an Optuna study: trainer.seed for a new study; for one continued from its storage,
    a seed drawn from trainer.seed and the number of trials stored, so each run of the command proposes new
    points (a sampler seeded alike every time would propose the very trial 0 it proposed the first time)."""
    stored = _stored_trials(str(storage), str(study_name))
    if stored == 0:
        return int(seed)
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{stored}".encode()).digest()[:4], "big")


def _stored_trials(storage: str, study_name: str) -> int:
    """Trials (any state) of the study in its storage; 0 when there is no such study yet."""
    if storage.startswith("sqlite:///"):
        import sqlite3
        from urllib.parse import quote

        file = Path(storage[len("sqlite:///") :])
        if not file.is_file():
            return 0
        try:
            with sqlite3.connect(f"file:{quote(str(file))}?mode=ro", uri=True) as con:
                row = con.execute(
                    "select count(*) from trials join studies using (study_id) where studies.study_name = ?",
                    (study_name,),
                ).fetchone()
        except sqlite3.Error:  # not an Optuna file yet (no tables)
            return 0
        return int(row[0])
    import optuna  # another database: ask Optuna

    try:
        return len(optuna.load_study(study_name=study_name, storage=storage).trials)
    except KeyError:  # no such study
        return 0

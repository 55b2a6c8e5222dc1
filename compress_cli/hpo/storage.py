"""Where an hpo study lives and how it draws: the storage URL (SQLite by default, PostgreSQL for
several workers, with a driver that is installed), password redaction, and the sampler and pruner
factories."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from compress_cli.errors import StageError


def storage_url(spec: str | None, output_dir: Path, index: int) -> str | None:
    """The study's SQLAlchemy URL (None: in memory). ``spec`` None: a SQLite file for the ``hpo``
    stage ``index`` in ``output_dir`` (so an interrupted search resumes)."""
    if spec == "memory":
        return None
    if spec is None:
        path = Path(output_dir).resolve() / f"hpo-{index:02d}.db"
        path.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{path}"
    return with_driver(spec)


def with_driver(url: str) -> str:
    """``postgresql://`` without a driver: name one that is installed (SQLAlchemy 2.1 assumes
    psycopg 3, older versions psycopg2; the ``postgres`` extra installs psycopg2-binary)."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in ("postgresql", "postgres"):
        return url
    for module, driver in (("psycopg2", "psycopg2"), ("psycopg", "psycopg")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}://{rest}"
    return f"postgresql://{rest}"


def redact(url: str | None) -> str:
    """``url`` for messages and the report: the password hidden; ``memory`` for None."""
    if url is None:
        return "memory"
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1] if "@" in url else url


def open_storage(url: str | None, heartbeat_s: int | None) -> Any:
    """An Optuna storage for ``url`` (None: in memory); trials of a worker silent for 3 heartbeats
    are marked failed. A missing driver or an unreachable database is a StageError."""
    import optuna

    if url is None:
        return optuna.storages.InMemoryStorage()
    kw: dict[str, Any] = {}
    if heartbeat_s is not None:
        kw.update(heartbeat_interval=heartbeat_s, grace_period=3 * heartbeat_s)
    last: Exception | None = None
    for attempt in range(3):  # workers starting together may race to create the tables
        try:
            return optuna.storages.RDBStorage(url, **kw)
        except ImportError as e:
            raise StageError(
                f"storage {redact(url)}: a database driver is missing ({e}); for PostgreSQL "
                "install the 'postgres' extra (psycopg2-binary)"
            ) from None
        except Exception as e:
            last = e
            time.sleep(0.5 + random.random() * (attempt + 1))
    raise StageError(
        f"storage {redact(url)}: cannot open the study database: {type(last).__name__}: "
        f"{str(last).splitlines()[0] if str(last) else ''}"
    ) from None


def make_sampler(name: str, seed: int, startup_trials: int, shared: bool) -> Any:
    """The Optuna sampler ``name`` (tpe, random, cmaes); ``shared``: several workers draw from one
    study (TPE's constant liar keeps them from sampling the same point)."""
    import optuna

    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        try:
            import cmaes  # noqa: F401
        except ImportError:
            raise StageError("sampler cmaes needs the 'cmaes' package (pip install cmaes)") from None
        return optuna.samplers.CmaEsSampler(
            seed=seed, n_startup_trials=startup_trials, warn_independent_sampling=False
        )
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup_trials, constant_liar=shared)


def make_pruner(name: str, startup_trials: int, warmup_epochs: int) -> Any:
    """The Optuna pruner ``name`` (median, hyperband, none)."""
    import optuna

    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=warmup_epochs)
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
    return optuna.pruners.NopPruner()

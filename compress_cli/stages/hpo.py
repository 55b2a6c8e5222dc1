"""The ``hpo`` stage: Optuna hyperparameter search over the parameters of the stages it wraps.

The config and its validation live here; the search itself is ``compress_cli.hpo``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from compress_cli.config.bounds import MAX_COUNT, MAX_EPOCHS, MAX_SECONDS
from compress_cli.config.problems import user_loc
from compress_cli.hpo.space import Direction, Distribution, Objective, resolve_space_key, with_params
from compress_cli.stages.base import Stage, StageConfig, StageResult
from compress_cli.stages.registry import register_stage
from compress_cli.state import State


class HpoConfig(StageConfig):
    """Hyperparameter search with Optuna over the parameters of the stages it wraps."""

    stages: list[SerializeAsAny[StageConfig]] = Field(
        min_length=1, description="the stages each trial runs, on a copy of the current model"
    )
    space: dict[str, Distribution] = Field(
        min_length=1, description="STAGE.param (STAGE: a wrapped stage's name, type or index) -> distribution"
    )
    n_trials: int | None = Field(
        20, gt=0, le=MAX_COUNT, description="trials in the study in total (all workers and resumes)"
    )
    timeout_s: float | None = Field(
        None, gt=0, le=MAX_SECONDS, description="stop starting trials after this many seconds"
    )
    objectives: list[Annotated[Objective, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]] = Field(
        default_factory=lambda: ["accuracy"],
        min_length=1,
        description="what trials are scored on (several: a Pareto front): accuracy (classification; "
        "other tasks: their primary metric), score (the task's primary metric), any metric of the task "
        "(cosine, sqnr_db, top5, ...), latency_ms, size_bytes, nonzero_params, macs",
    )
    directions: dict[str, Direction] = Field(
        default_factory=dict,
        description="objective -> maximize | minimize, for a metric whose direction the task does not "
        "know (default: the task's direction; latency, size, params and MACs are minimized)",
    )
    sampler: Literal["tpe", "random", "cmaes"] = Field("tpe", description="how trials pick parameters")
    sampler_startup_trials: int = Field(
        5, ge=0, le=MAX_COUNT, description="tpe/cmaes: random trials before the model-based search"
    )
    pruner: Literal["median", "hyperband", "none"] = Field(
        "median", description="stop trials whose per-epoch validation accuracy lags (single objective only)"
    )
    pruner_startup_trials: int = Field(
        3, ge=0, le=MAX_COUNT, description="median: trials that are never pruned"
    )
    pruner_warmup_epochs: int = Field(
        0, ge=0, le=MAX_EPOCHS, description="median: epochs of each trial that are never pruned"
    )
    enqueue_defaults: bool = Field(
        True,
        description="trial 0 runs the wrapped stages' configured values (those inside the space), "
        "so the search is measured against what you configured",
    )
    storage: str | None = Field(
        None,
        description="SQLAlchemy URL of the study (sqlite:///f.db, postgresql://user@host/db); "
        "'memory' keeps it in memory; default: a SQLite file in the output directory "
        "(an interrupted search resumes)",
    )
    study_name: str | None = Field(
        None, description="study to create or join (default: from the recipe name)"
    )
    heartbeat_s: int | None = Field(
        60,
        gt=0,
        le=86_400,
        description="database storages: trials of a worker silent for 3x this long are marked failed",
    )

    @field_validator("stages", mode="before")
    @classmethod
    def _wrapped_configs(cls, value: Any) -> Any:
        """Validate each wrapped stage through its own config model; errors keep their location."""
        from compress_cli.errors import did_you_mean
        from compress_cli.stages.registry import get_stage, list_stages

        if not isinstance(value, list):
            return value
        out: list[Any] = []
        errors: list[InitErrorDetails] = []
        known = list_stages()
        for i, item in enumerate(value):
            if isinstance(item, StageConfig):
                out.append(item)
                continue
            if not isinstance(item, dict) or not isinstance(item.get("type"), str):
                errors.append(_err((i,), "must be a mapping with a 'type' key (a stage type)", item))
                continue
            t = item["type"]
            if t not in known:
                errors.append(_err((i, "type"), f"unknown stage type {t!r}{did_you_mean(t, known)}", t))
                continue
            if t == "hpo":
                errors.append(_err((i, "type"), "hpo cannot wrap another hpo", t))
                continue
            config_class = get_stage(t).config_class
            try:
                out.append(config_class.model_validate(item))
            except ValidationError as e:
                for d in e.errors():
                    loc = (i, *d["loc"])
                    if d["type"] == "extra_forbidden":
                        import difflib

                        close = difflib.get_close_matches(
                            str(d["loc"][-1]), list(config_class.model_fields), 1, 0.5
                        )
                        hint = f" (did you mean {close[0]!r}?)" if close else ""
                        errors.append(_err(loc, f"unknown key for {t}{hint}", d.get("input")))
                    else:
                        errors.append(_err(loc, f"{t}: {d['msg']}", d.get("input")))
        if errors:
            raise ValidationError.from_exception_data("HpoConfig", errors)
        return out

    @model_validator(mode="after")
    def _space_and_modes(self) -> HpoConfig:
        errors: list[InitErrorDetails] = []
        for key, dist in self.space.items():
            try:
                index, path = resolve_space_key(self.stages, key)
            except ValueError as e:
                errors.append(_err(("space", key), str(e), key))
                continue
            cfg = self.stages[index]
            for v in dist.probe_values():
                try:
                    with_params(cfg, {path: v})
                except ValidationError as e:
                    first = e.errors()[0]
                    where = ".".join(str(p) for p in user_loc(tuple(first["loc"]))) or path
                    errors.append(
                        _err(
                            ("space", key),
                            f"value {v!r} is not valid for {cfg.type}.{where}: {first['msg']}",
                            v,
                        )
                    )
                    break
                except ValueError as e:
                    errors.append(_err(("space", key), str(e), v))
                    break
        if self.n_trials is None and self.timeout_s is None:
            errors.append(
                _err(("n_trials",), "set n_trials and/or timeout_s (the search needs an end)", None)
            )
        if len(set(self.objectives)) != len(self.objectives):
            errors.append(_err(("objectives",), "each objective may appear once", self.objectives))
        for name in self.directions:
            if name not in self.objectives:
                errors.append(
                    _err(
                        ("directions", name), f"{name!r} is not one of the objectives {self.objectives}", name
                    )
                )
        if len(self.objectives) > 1 and self.pruner != "none":
            errors.append(
                _err(
                    ("pruner",),
                    "pruning needs a single objective: set pruner: none for a multi-objective search",
                    self.pruner,
                )
            )
        if len(self.objectives) > 1 and self.sampler == "cmaes":
            errors.append(
                _err(("sampler",), "cmaes searches a single objective; use tpe or random", self.sampler)
            )
        if errors:
            raise ValidationError.from_exception_data("HpoConfig", errors)
        return self


def _err(loc: tuple[Any, ...], message: str, value: Any) -> InitErrorDetails:
    return InitErrorDetails(type=PydanticCustomError("hpo", message), loc=loc, input=value)  # type: ignore[arg-type]


@register_stage("hpo")
class Hpo(Stage[HpoConfig]):
    """Hyperparameter search (Optuna): trials run the wrapped stages; the best trial's model is kept.

    Each trial deep-copies the current model (and hparams, edits, transforms), samples the
    ``space``, runs the wrapped stages and scores the result on the validation split; every
    training epoch reports validation accuracy so the pruner can stop a trial early. The study lives
    in ``storage`` (a SQLite file in the output directory by default, so an interrupted search
    resumes; a shared PostgreSQL URL lets several ``compress run`` workers split the trials);
    ``n_trials`` counts all trials of the study. A trial whose stage fails is marked failed and the
    search goes on; an interrupted trial is marked failed, never left running.
    """

    example = {
        "stages": [{"type": "finetune", "epochs": 1, "max_steps_per_epoch": 3}],
        "space": {"finetune.lr": {"float": [1e-3, 1e-1], "log": True}},
        "n_trials": 2,
        "pruner": "none",
        "storage": "memory",
    }

    @classmethod
    def children(cls, config: StageConfig) -> list[tuple[str, list[StageConfig]]]:
        return [("stages", list(config.stages))]  # type: ignore[attr-defined]

    @classmethod
    def _any(cls, config: StageConfig, prop: str) -> bool:
        from compress_cli.stages.registry import get_stage

        return any(getattr(get_stage(c.type), prop)(c) for c in config.stages)  # type: ignore[attr-defined]

    @classmethod
    def trains(cls, config: StageConfig) -> bool:
        return cls._any(config, "trains")

    @classmethod
    def modifies(cls, config: StageConfig) -> bool:
        return cls._any(config, "modifies")

    @classmethod
    def freezes(cls, config: StageConfig) -> bool:
        return cls._any(config, "freezes")

    def preview(self, state: State) -> list[str]:
        c = self.config
        end = " and ".join(
            x
            for x in (
                f"{c.n_trials} trials" if c.n_trials else "",
                f"{c.timeout_s:g} s" if c.timeout_s else "",
            )
            if x
        )
        lines = [
            f"search {end} of: "
            + " -> ".join(s.name or s.type for s in c.stages)
            + f" ({c.sampler}, pruner {c.pruner}, objectives {', '.join(c.objectives)})"
        ]
        lines += [f"  {k}: {d.describe()}" for k, d in c.space.items()]
        return lines

    def preflight(self, state: State) -> None:
        """Refuse an objective that is not a metric of the task (or of every measurement)."""
        from compress_cli.errors import StageError
        from compress_cli.hpo.space import objective_problem

        task = state.data.get_task()
        for name in self._objectives(state):
            problem = objective_problem(name, getattr(task, "metrics", {}) or {})
            if problem is not None:
                raise StageError(problem)

    def _objectives(self, state: State) -> list[str]:
        """The objectives as configured; the default ``accuracy`` means the task's primary metric
        (``score``) for a task without an accuracy metric."""
        task = state.data.get_task()
        c = self.config
        metrics = getattr(task, "metrics", {}) or {}
        if "objectives" not in c.model_fields_set and metrics and "accuracy" not in metrics:
            return ["score"]
        return list(c.objectives)

    def run(self, state: State) -> StageResult:
        from compress_cli.hpo.search import Search
        from compress_cli.stages.registry import get_stage

        cfg = self.config.model_copy(update={"objectives": self._objectives(state)})
        notes, details = Search(cfg, self.index, self.name, state, lambda c, i: get_stage(c.type)(c, i)).run()
        return StageResult(notes=notes, details=details)

"""The search space of an ``hpo`` stage, torch- and optuna-free: the objectives, one dimension
(:class:`Distribution`), how ``STAGE.param`` keys resolve to a wrapped stage's config, how a
config gets a sampled value, and how a trial samples one.

The ``hpo`` stage's config validation and the search itself both use these; neither imports the
other for them (stages import hpo, never the reverse).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

if TYPE_CHECKING:
    from compress_cli.stages.base import StageConfig

#: an objective: one of :data:`OBJECTIVES`, ``score`` (the task's primary metric) or the name of
#: any metric of the task (``cosine``, ``sqnr_db``, ``top5``, ...; checked against the task when
#: the stage runs)
Objective = str

#: the objectives every task has, and which way is better
OBJECTIVES = {
    "accuracy": "maximize",  # top-1 on the validation split (classification)
    "latency_ms": "minimize",  # median batch-1 latency through the trial's runner
    "size_bytes": "minimize",  # bytes of the trial model's compressed checkpoint
    "nonzero_params": "minimize",
    "macs": "minimize",
}
#: the objective that is the task's primary metric, in its direction
SCORE = "score"
Direction = Literal["maximize", "minimize"]


def objective_direction(
    name: str, primary: str, higher_is_better: bool, metric_direction: Any, given: dict[str, str]
) -> str:
    """``maximize`` or ``minimize`` for objective ``name``: as ``given`` by the user, else fixed
    for :data:`OBJECTIVES`, else the task's: its primary metric's direction for ``score`` and the
    primary itself, ``metric_direction(name)`` (True: higher is better) for its other metrics."""
    if name in given:
        return given[name]
    if name in OBJECTIVES:
        return OBJECTIVES[name]
    if name in (SCORE, primary):
        return "maximize" if higher_is_better else "minimize"
    return "maximize" if metric_direction(name) else "minimize"


def objective_problem(name: str, task_metrics: Any) -> str | None:
    """Why ``name`` is not an objective of a task with metrics ``task_metrics`` (None: it is; a
    task that lists no metrics accepts any name)."""
    known = [*OBJECTIVES, SCORE, *task_metrics]
    if name in known or not task_metrics:
        return None
    from compress_cli.errors import did_you_mean

    hint = did_you_mean(name, known)
    return f"objectives: {name!r} is not a metric of the task (known: {', '.join(known)}){hint}"


class Distribution(BaseModel):
    """One search dimension: ``{float: [lo, hi], log: true}``, ``{int: [lo, hi]}`` or
    ``{categorical: [...]}``."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    float_: tuple[float, float] | None = Field(None, alias="float", description="a real number in [lo, hi]")
    int_: tuple[int, int] | None = Field(None, alias="int", description="an integer in [lo, hi]")
    categorical: list[None | bool | int | float | str] | None = Field(
        None, min_length=1, description="one of these values"
    )
    log: bool = Field(False, description="sample on a log scale (lo > 0)")
    step: float | None = Field(None, gt=0, description="sample on a grid with this spacing (not with log)")

    @model_validator(mode="after")
    def _one_kind(self) -> Distribution:
        kinds = [
            k
            for k, v in (("float", self.float_), ("int", self.int_), ("categorical", self.categorical))
            if v is not None
        ]
        if len(kinds) != 1:
            raise ValueError(
                f"give exactly one of float, int, categorical (got {', '.join(kinds) or 'none'})"
            )
        rng = self.float_ if self.float_ is not None else self.int_
        if rng is not None:
            lo, hi = rng
            if not lo < hi:
                raise ValueError(f"the range needs lo < hi (got [{lo}, {hi}])")
            if self.log and lo <= 0:
                raise ValueError(f"log needs lo > 0 (got {lo})")
            if self.log and self.step is not None:
                raise ValueError("log and step cannot be combined")
            if self.int_ is not None and self.step is not None and self.step != int(self.step):
                raise ValueError(f"int: step must be a whole number (got {self.step})")
            if self.step is not None and self.step > hi - lo:
                raise ValueError(f"step must be at most hi - lo = {hi - lo} (got {self.step})")
        elif self.log or self.step is not None:
            raise ValueError("log and step apply to float and int ranges only")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> dict[str, Any]:
        d = handler(self)
        return {{"float_": "float", "int_": "int"}.get(k, k): v for k, v in d.items()}

    def probe_values(self) -> list[Any]:
        """Values that must all be valid for the wrapped stage (the range ends, every choice)."""
        if self.categorical is not None:
            return list(self.categorical)
        rng = self.float_ if self.float_ is not None else self.int_
        return list(rng) if rng is not None else []

    def contains(self, v: Any) -> bool:
        """Whether ``v`` is a value this distribution can produce."""
        if self.categorical is not None:
            return v in self.categorical
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return False
        rng = self.float_ if self.float_ is not None else self.int_
        assert rng is not None
        lo, hi = rng
        if not lo <= v <= hi or (self.int_ is not None and v != int(v)):
            return False
        if self.step:
            k = (v - lo) / self.step
            return abs(k - round(k)) < 1e-9
        return True

    def describe(self) -> str:
        """For people: ``float in [0.001, 0.1] (log)``, ``one of ['sgd', 'adam']``."""
        if self.categorical is not None:
            return f"one of {self.categorical}"
        rng = self.float_ if self.float_ is not None else self.int_
        kind = "float" if self.float_ is not None else "int"
        return (
            f"{kind} in {list(rng or ())}"
            + (" (log)" if self.log else "")
            + (f" step {self.step:g}" if self.step else "")
        )


def resolve_space_key(stages: list[StageConfig], key: str) -> tuple[int, str]:
    """``STAGE.param.sub`` -> (index of the wrapped stage, ``param.sub``). STAGE is the stage's
    ``name``, its type (when only one wrapped stage has it) or its index."""
    head, sep, path = key.partition(".")
    if not sep or not path:
        raise ValueError(f"space key {key!r}: expected STAGE.param (e.g. finetune.lr)")
    if head.isdigit():
        i = int(head)
        if i >= len(stages):
            raise ValueError(f"space key {key!r}: there are only {len(stages)} wrapped stage(s)")
        match = [i]
    else:
        match = [i for i, s in enumerate(stages) if s.name == head]
        if not match:
            match = [i for i, s in enumerate(stages) if s.type == head and s.name is None]
    if not match:
        names = sorted({s.name or s.type for s in stages})
        raise ValueError(f"space key {key!r}: no wrapped stage named {head!r} (have: {', '.join(names)})")
    if len(match) > 1:
        raise ValueError(
            f"space key {key!r}: {len(match)} wrapped stages are {head!r}; give them names or use an index"
        )
    cfg = stages[match[0]]
    top = path.split(".")[0]
    if top in ("type", "name") or top not in type(cfg).model_fields:
        fields = [f for f in type(cfg).model_fields if f not in ("type", "name", "on_violation")]
        raise ValueError(f"space key {key!r}: {cfg.type} has no parameter {top!r} (has: {', '.join(fields)})")
    return match[0], path


def with_params(cfg: StageConfig, values: dict[str, Any]) -> StageConfig:
    """A copy of ``cfg`` with dotted parameter paths set, validated again by its own model."""
    d = cfg.model_dump(mode="python", round_trip=True)
    for path, v in values.items():
        node = d
        parts = path.split(".")
        for p in parts[:-1]:
            nxt = node.get(p) if isinstance(node, dict) else None
            if nxt is None:
                nxt = {}
                node[p] = nxt
            if not isinstance(nxt, dict):
                raise ValueError(f"{cfg.type}.{path}: {p} is not a mapping")
            node = nxt
        node[parts[-1]] = v
    return type(cfg).model_validate(d)


def sample_param(trial: Any, key: str, dist: Distribution) -> Any:
    """Draw the value of ``key`` from ``dist`` through an Optuna trial (``suggest_*``)."""
    if dist.categorical is not None:
        return trial.suggest_categorical(key, dist.categorical)
    if dist.int_ is not None:
        return trial.suggest_int(key, *dist.int_, step=int(dist.step or 1), log=dist.log)
    assert dist.float_ is not None
    return trial.suggest_float(key, *dist.float_, step=dist.step, log=dist.log)

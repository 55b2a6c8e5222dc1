"""The ``prune`` stage: unstructured L1-magnitude pruning, one shot or gradual, global or per layer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from compress_cli.config.bounds import MAX_EPOCHS, MAX_STEPS
from compress_cli.stages.base import Stage, StageConfig, StageResult
from compress_cli.stages.registry import register_stage
from compress_cli.state import State
from compress_cli.training import TrainOptions

Fraction = Annotated[float, Field(ge=0, lt=1)]
Ratio = Annotated[float, Field(gt=0, lt=1)]


class PruneSchedule(TrainOptions):
    """Gradual pruning: ``steps`` pruning steps on the cubic schedule, fine-tuning after each."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(
        ge=1,
        le=1000,
        description="pruning steps; sparsity after step k of n is s_f + (s_i - s_f)(1 - k/n)^3 (Zhu & Gupta)",
    )
    initial_sparsity: float = Field(0.0, ge=0, lt=1, description="s_i: sparsity before the first step")
    epochs: int = Field(
        1,
        ge=0,
        le=MAX_EPOCHS,
        validation_alias=AliasChoices("finetune_epochs", "epochs"),
        description="finetune_epochs: fine-tuning epochs after each step (0: prune only)",
    )


class SensitivityOptions(BaseModel):
    """Per-layer sensitivity scan that allocates the sparsity where it hurts least."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ratios: list[Ratio] = Field(
        default_factory=lambda: [0.5, 0.7, 0.8, 0.9, 0.95, 0.98],
        min_length=1,
        description="sparsities each layer is tried at (one layer at a time)",
    )
    max_batches: int | None = Field(
        None, gt=0, le=MAX_STEPS, description="validation batches per measurement (default: all)"
    )

    @field_validator("ratios")
    @classmethod
    def _sorted(cls, v: list[float]) -> list[float]:
        return sorted(set(v))


class PruneConfig(StageConfig):
    """Unstructured L1-magnitude pruning (torch.nn.utils.prune)."""

    sparsity: float = Field(
        gt=0, lt=1, description="fraction of the selected weights set to zero (cumulative)"
    )
    scope: Literal["global", "layer"] = Field(
        "global", description="rank weights across all selected layers, or within each layer"
    )
    include: list[str] = Field(default_factory=lambda: ["*"], description="module name globs to prune")
    exclude: list[str] = Field(default_factory=list, description="module name globs to leave alone")
    layers: dict[str, Fraction] = Field(
        default_factory=dict,
        description="per-layer sparsity overrides {glob: sparsity}; these layers leave the global pool",
    )
    include_head: bool = Field(
        False, description="also prune the classifier head (the layer producing the logits)"
    )
    schedule: PruneSchedule | None = Field(
        None, description="gradual pruning with fine-tuning (default: one shot)"
    )
    sensitivity: SensitivityOptions | None = Field(
        None, description="choose per-layer sparsities from a per-layer scan (replaces scope)"
    )

    @model_validator(mode="after")
    def _schedule_below_target(self) -> PruneConfig:
        if self.schedule is not None and self.schedule.initial_sparsity >= self.sparsity:
            raise ValueError(
                f"schedule.initial_sparsity ({self.schedule.initial_sparsity}) "
                f"must be below sparsity ({self.sparsity})"
            )
        return self


@register_stage("prune")
class Prune(Stage[PruneConfig]):
    """Unstructured L1-magnitude pruning, one-shot or gradual (cubic schedule), global or per layer.

    The selected Linear/Conv weights (``include``/``exclude``, the classifier head only with
    ``include_head``) are masked with ``torch.nn.utils.prune``: ``scope: global`` ranks all of them
    together (``global_unstructured``), ``scope: layer`` each layer on its own
    (``l1_unstructured``); ``layers`` pins a sparsity per glob. ``sparsity`` is cumulative: on an
    already-pruned model the masks compose and the stage prunes up to the target. With
    ``schedule`` the sparsity rises over ``steps`` on Zhu & Gupta's cubic curve, with
    ``finetune_epochs`` of training (any finetune option) after each step. With ``sensitivity``
    each layer is first pruned alone at ``ratios`` to measure its validation drop, and the
    per-layer sparsities reaching the target with the least damage are used (table in the
    report). Masks stay in force through every later training stage: a pruned weight stays
    exactly zero. The checkpoint stores the weights as bitmask + nonzero values.
    """

    example = {
        "sparsity": 0.5,
        "schedule": {"steps": 2, "finetune_epochs": 1, "lr": 0.01, "max_steps_per_epoch": 2},
    }

    @classmethod
    def trains(cls, config: StageConfig) -> bool:
        sched = getattr(config, "schedule", None)
        return sched is not None and sched.epochs > 0

    def _plan(self, state: State) -> tuple[Any, list[Any], str | None, dict[str, float]]:
        from compress_cli import pruning as P
        from compress_cli.errors import StageError

        cfg = self.config
        from compress_cli._utils.batches import to_device

        head = P.find_head(state.model, to_device(state.data.example_input(1), state.device))
        targets = P.select_targets(state.model, cfg.include, cfg.exclude, head, cfg.include_head)
        if not targets:
            raise StageError(
                f"no prunable layer (Linear/Conv) matches include {cfg.include} / exclude {cfg.exclude}"
                + (
                    f" (the head {head!r} is left out unless include_head: true)"
                    if head and not cfg.include_head
                    else ""
                )
            )
        overrides, unmatched = P.match_overrides(targets, cfg.layers)
        if unmatched:
            names = ", ".join(n for n, _ in targets)
            raise StageError(
                f"layers: {', '.join(map(repr, unmatched))} match no selected layer (selected: {names})"
            )
        return P, targets, head, overrides

    def preflight(self, state: State) -> None:
        """No layer matches include/exclude, or a ``layers`` glob matches none of them: refused now."""
        self._plan(state)

    def preview(self, state: State) -> list[str]:
        _, targets, head, overrides = self._plan(state)
        cfg = self.config
        how = "sensitivity scan" if cfg.sensitivity else f"{cfg.scope} {cfg.sparsity:g}"
        lines = [
            f"{n} ({m.weight.numel()} weights): {overrides[n]:g}"
            if n in overrides
            else f"{n} ({m.weight.numel()} weights): {how}"
            for n, m in targets
        ]
        if head and not cfg.include_head:
            lines.append(f"{head}: classifier head, not pruned")
        return lines

    def run(self, state: State) -> StageResult:
        from compress_cli.errors import StageError
        from compress_cli.training import train

        P, targets, head, overrides = self._plan(state)
        cfg = self.config
        mods = dict(targets)
        groups = [P.Group([n], [mods[n]], s) for n, s in overrides.items()]
        free = [(n, m) for n, m in targets if n not in overrides]
        details: dict[str, Any] = {"head": head, "head_pruned": bool(head and head in mods)}
        if free and cfg.sensitivity is not None:
            task = state.data.get_task()
            if task.needs_labels and not state.data.labelled:
                raise StageError(
                    f"sensitivity: the {task.name} task needs labelled validation data to measure score "
                    "drops; use task: fidelity (scored against the original model) or drop sensitivity"
                )
            state.ctx.listener.on_message(f"{self.name}: sensitivity scan of {len(free)} layers")
            scan = P.scan_sensitivity(
                free,
                cfg.sensitivity.ratios,
                _val_accuracy(state, cfg.sensitivity.max_batches),
                on_step=lambda: state.ctx.listener.on_step("sensitivity"),
            )
            floors = {n: P.layer_sparsity(m) for n, m in free}
            try:
                chosen = P.allocate(scan, cfg.sparsity, floors)
            except ValueError as e:
                raise StageError(f"sensitivity: {e}") from None
            groups += [P.Group([n], [m], chosen[n]) for n, m in free]
            details["sensitivity"] = {
                "baseline_val_accuracy": scan.baseline_accuracy,
                "ratios": scan.ratios,
                "table": scan.table(),  # accuracy drop in points per layer and ratio
                "chosen": {n: round(s, 4) for n, s in chosen.items()},
            }
        elif free and cfg.scope == "global":
            groups.append(P.Group([n for n, _ in free], [m for _, m in free], cfg.sparsity, pooled=True))
        else:
            groups += [P.Group([n], [m], cfg.sparsity) for n, m in free]

        history: list[dict[str, Any]] = []
        if cfg.schedule is None:
            for g in groups:
                g.apply(g.final)
        else:
            n = cfg.schedule.steps
            plans = [P.cubic_schedule(cfg.schedule.initial_sparsity, g.final, n) for g in groups]
            for k in range(n):
                for g, plan in zip(groups, plans, strict=True):
                    g.apply(plan[k])
                _, reached = P.summary(targets)
                state.ctx.listener.on_message(f"{self.name}: step {k + 1}/{n}, sparsity {reached:.3f}")
                res = train(state.model, state, cfg.schedule, label=f"{self.name} {k + 1}/{n}")
                entry = {"step": k + 1, "sparsity": round(reached, 4), "epochs": res.epochs_run}
                if res.history and "val_accuracy" in res.history[-1]:
                    entry["val_accuracy"] = res.history[-1]["val_accuracy"]
                elif res.history and "val_score" in res.history[-1]:
                    entry["val_score"] = res.history[-1]["val_score"]
                history.append(entry)
                if state.ctx.should_stop():
                    break
        per, overall = P.summary(targets)
        details.update({"overall_sparsity": round(overall, 4), "layers": per})
        if history:
            details["schedule"] = history
        # the manifest keeps the gist (it is stored uncompressed); per-layer numbers go to the report
        state.edits.record(self.name, op="prune", sparsity=round(overall, 4), layers=len(targets))
        how = "sensitivity" if cfg.sensitivity else cfg.scope
        notes = f"{len(targets)} layers at {overall * 100:.1f}% sparsity ({how}"
        notes += f", {len(history)} steps)" if history else ", one shot)"
        return StageResult(notes=notes, details=details)


def _val_accuracy(state: State, max_batches: int | None) -> Callable[[], float]:
    """A callable giving ``state.model``'s validation score (torch eager, on the run device) over its
    first ``max_batches`` validation batches (all by default), held in memory so every measurement
    of a sensitivity scan sees the same batches: the task's primary metric, negated when lower is
    better (top-1 accuracy for classification), so higher is always better."""
    from compress_cli.runtime.measure import evaluate
    from compress_cli.runtime.runners import EagerRunner

    batches = []
    for i, b in enumerate(state.data.loader("val", shuffle=False)):
        if max_batches is not None and i >= max_batches:
            break
        batches.append(b)
    runner = EagerRunner(state.model, state.device)
    task = state.data.get_task()
    sign = 1.0 if task.higher_is_better else -1.0
    # evaluate takes any iterable of batches, not only a DataLoader; "sensitivity" keys the cached
    # original outputs (tasks that compare with the original model)
    return lambda: sign * evaluate(runner, batches, task, split="sensitivity")[task.primary]  # type: ignore[arg-type]

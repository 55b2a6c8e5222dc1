"""The ``drop_layers`` stage: remove whole residual blocks and layers, least important first."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import Field, model_validator

from compress_cli.config.bounds import MAX_EPOCHS
from compress_cli.errors import StageError
from compress_cli.stages.base import Stage, StageConfig, StageResult
from compress_cli.stages.registry import register_stage
from compress_cli.state import State
from compress_cli.training import TrainOptions

if TYPE_CHECKING:
    from torch import nn

    from compress_cli.pruning import Candidate
    from compress_cli.pruning.layers import Describer


class DropLayersConfig(StageConfig, TrainOptions):
    """Remove whole residual blocks and shape-preserving layers, least important first."""

    importance: Literal["activation", "loss", "similarity", "output"] = Field(
        "loss",
        description="activation: mean |z| a block adds to its bypass, relative to the bypass; loss: increase "
        "of the task's calibration loss when the block is bypassed; similarity: cosine of block output and "
        "bypass (most similar removed first); output: 1 - cosine of the model's output with the block "
        "bypassed to its output without (label-free)",
    )
    count: int | None = Field(None, ge=1, le=100_000, description="number of layers/blocks to remove")
    fraction: float | None = Field(None, gt=0, lt=1, description="share of the candidates to remove")
    protect: list[str] = Field(
        default_factory=list, description="module-name globs never removed (nor any block holding one)"
    )
    epochs: int = Field(0, ge=0, le=MAX_EPOCHS, description="fine-tuning epochs after the removal (0: none)")
    if_none: Literal["fail", "skip"] = Field(
        "fail", description="when the model has no removable layer: fail the run, or skip with a note"
    )

    @model_validator(mode="after")
    def _one_amount(self) -> DropLayersConfig:
        if (self.count is None) == (self.fraction is None):
            raise ValueError("give exactly one of count or fraction")
        return self


@register_stage("drop_layers")
class DropLayers(Stage[DropLayersConfig]):
    """Remove whole layers/blocks ranked by importance (the seed's model cutting).

    Candidates: residual blocks (replaced by identity, or by their downsample/shortcut path when
    shapes change) and layers with parameters inside ``nn.Sequential`` stacks whose output shape
    equals their input shape (replaced by identity), and the same in an ``nn.ModuleList`` run as a
    stack (a transformer's encoder layers: each takes the previous one's output; replaced by a
    pass-through of that tensor, the mask and other arguments ignored). The output layer and
    ``protect`` globs are never removed. Scores come from the calibration batches. Optional
    fine-tuning afterwards.

    The removal is proven exact (``details.exactness``): the edited model must compute what the
    model computes with the removed modules bypassed in place, or the stage refuses and leaves the
    model unchanged. A model with no candidate is refused before the baseline (``if_none: skip``
    goes on without the stage).
    """

    #: zoo:digits_cnn (the contract model) has no removable layer; the tests drop blocks of digits_resnet
    example = {"count": 1, "importance": "loss", "if_none": "skip"}

    @classmethod
    def trains(cls, config: StageConfig) -> bool:
        return isinstance(config, DropLayersConfig) and config.epochs > 0

    def _describe(self, state: State) -> Describer:
        """The manifest's check of a replacement module (candidates it rejects are left out)."""
        import functools

        from compress_cli.checkpoint.architecture import describe_problem

        return functools.partial(describe_problem, source=state.model_spec.source)

    def _find(
        self, state: State, model: nn.Module, left_out: list[tuple[str, str]] | None = None
    ) -> list[Candidate]:
        """The candidates in ``model`` (made permanent, put in eval mode) the run could save."""
        from compress_cli._utils.batches import to_device
        from compress_cli.pruning import find_candidates, make_permanent

        make_permanent(model)
        example = to_device(state.data.example_input(1), state.device)
        return find_candidates(
            model.eval(), example, self.config.protect, describe=self._describe(state), left_out=left_out
        )

    def _candidates(self, state: State) -> list[Candidate]:
        from compress_cli.pruning import score_candidates

        cands = self._find(state, state.model)
        if cands:
            score_candidates(
                state.model, cands, state.data.calibration(), self.config.importance, state.data.get_task()
            )
        return cands

    def preflight(self, state: State) -> None:
        """Refuse, before the baseline, a loss ranking the data cannot give (no labels for a task
        that needs them) and a model with no removable layer (unless ``if_none: skip``)."""
        from compress_cli.checkpoint import copy_model
        from compress_cli.pruning import unsaveable_note

        c = self.config
        _check_labels(c, state)
        if c.if_none == "skip":
            return
        left_out: list[tuple[str, str]] = []
        if not self._find(state, copy_model(state.model), left_out):
            guarded = f" outside protect {c.protect}" if c.protect else ""
            raise StageError(
                f"no removable layer in this model{guarded}: drop_layers removes residual blocks "
                "(forward ending in post(main(x) + shortcut(x))) and shape-preserving layers inside an "
                "nn.Sequential or an nn.ModuleList run as a stack, and this model has neither. Remove "
                "the stage, narrow protect, or set "
                f"if_none: skip to go on without it{unsaveable_note(left_out)}"
            )

    def new_modules(self, state: State) -> list[tuple[str, nn.Module]]:
        """Each candidate's bypass, at the candidate's path (the candidates are found on a copy;
        those whose bypass the manifest could not describe are already left out)."""
        from compress_cli.checkpoint import copy_model

        model = copy_model(state.model)
        return [(x.name, x.make(model)) for x in self._find(state, model)]

    def preview(self, state: State) -> list[str]:
        import copy

        from compress_cli.pruning import choose

        c = self.config
        work = copy.copy(state)
        work.model = copy.deepcopy(state.model)
        cands = self._candidates(work)
        if not cands:
            return ["no candidate: no residual block or shape-preserving layer in a Sequential or ModuleList"]
        n = c.count if c.count is not None else int(c.fraction * len(cands))  # type: ignore[operator]
        chosen = {x.name for x in choose(cands, n, c.importance)}
        first = "higher" if c.importance == "similarity" else "lower"
        lines = [
            f"{len(cands)} candidate(s), {c.importance} score ({first} "
            f"goes first); {len(chosen)} would be removed (*)"
        ]
        for x in cands:
            mark = "*" if x.name in chosen else " "
            lines.append(
                f"{mark} {x.name}: {x.kind} -> {x.replacement}, {x.params:,} params, score {x.score:.4g}"
            )
        return lines

    def run(self, state: State) -> StageResult:
        from compress_cli.pruning import CHECK_SAMPLES, drop_layers
        from compress_cli.training import train

        c = self.config
        task = state.data.get_task()
        _check_labels(c, state)
        before = sum(p.numel() for p in state.model.parameters())
        if c.if_none == "skip":
            from compress_cli.pruning import unsaveable_note

            left_out: list[tuple[str, str]] = []
            if not self._find(state, state.model, left_out):
                return StageResult(
                    notes="skipped: no removable layer (residual block or shape-preserving layer)"
                    + unsaveable_note(left_out),
                    details={"candidates": [], "removed": []},
                )
        cands, chosen, exact = drop_layers(
            state.model,
            state.data.example_input(1),
            state.data.calibration(),
            criterion=c.importance,
            count=c.count,
            fraction=c.fraction,
            protect=c.protect,
            check_inputs=state.data.example_input(CHECK_SAMPLES),
            task=task,
            describe=self._describe(state),
        )
        after = sum(p.numel() for p in state.model.parameters())
        removed = [x.name for x in chosen]
        state.edits.record(
            self.name,
            op="drop_layers",
            importance=c.importance,
            removed=removed,
            params_before=before,
            params_after=after,
        )
        state.ctx.listener.on_message(f"{self.name}: removed {', '.join(removed)}")
        finetune = None
        if c.epochs > 0:
            finetune = train(state.model, state, c, label=self.name).summary()
        notes = (
            f"{len(removed)} of {len(cands)} candidate(s) removed ({c.importance}): {', '.join(removed)}; "
            f"params {before:,} -> {after:,}"
        )
        if c.count is not None and len(removed) < c.count:
            notes += f" (asked for {c.count}; nested candidates exclude each other)"
        return StageResult(
            notes=notes,
            details={
                "candidates": [
                    {
                        "name": x.name,
                        "kind": x.kind,
                        "replacement": x.replacement,
                        "params": x.params,
                        "score": x.score,
                        "removed": x.name in removed,
                    }
                    for x in cands
                ],
                "removed": removed,
                "exactness": exact.as_dict(),
                "params_before": before,
                "params_after": after,
                "finetune": finetune,
            },
        )


def _check_labels(c: DropLayersConfig, state: State) -> None:
    """StageError when ``importance: loss`` needs labels the data does not have."""
    task = state.data.get_task()
    if c.importance == "loss" and task.needs_labels and not state.data.labelled:
        raise StageError(
            f"importance 'loss' needs labelled data for the {task.name} task; use output, activation "
            "or similarity, or task: fidelity (its loss compares with the original model)"
        )

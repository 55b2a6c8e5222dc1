"""The ``prune_channels`` stage: remove output channels and neurons (torch-pruning), optionally in steps."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from compress_cli.config.bounds import MAX_EPOCHS
from compress_cli.errors import StageError
from compress_cli.stages.base import Stage, StageConfig, StageResult
from compress_cli.stages.registry import register_stage
from compress_cli.state import State
from compress_cli.training import TrainOptions

Ratio = Annotated[float, Field(gt=0, lt=1)]


class PruneChannelsConfig(StageConfig, TrainOptions):
    """Structured pruning: remove whole output channels of convolutions and neurons of linear layers."""

    importance: Literal["l1", "l2", "activation", "taylor", "bn_scale"] = Field(
        "l1",
        description="channel score: l1/l2 weight magnitude, activation (mean |z| over calibration batches), "
        "taylor (|weight x gradient| on calibration batches), bn_scale (|batch-norm gamma|)",
    )
    ratio: float = Field(0.5, gt=0, lt=1, description="share of output channels/neurons removed")
    scope: Literal["layer", "global"] = Field(
        "layer", description="layer: the same share from every layer; global: rank all channels together"
    )
    layer_ratios: dict[str, Ratio] = Field(
        default_factory=dict, description="module-name glob -> its own ratio (overrides ratio)"
    )
    max_ratio: float = Field(0.9, gt=0, lt=1, description="global scope: no layer loses more than this share")
    round_to: int | None = Field(None, ge=1, le=1024, description="keep channel counts multiples of this")
    ignore: list[str] = Field(
        default_factory=list,
        description="module-name globs whose output width is kept (the output layer always is)",
    )
    head_ratio: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of whole attention heads removed from each attention layer (timm ViT/DeiT "
        "Attention, Hugging Face BERT-style self-attention); 0 keeps every head. A head's own dims are "
        "never cut (that would change the attention's scaling); nn.MultiheadAttention keeps its heads "
        "(its embed_dim is the residual stream)",
    )
    steps: int = Field(1, ge=1, le=100, description="prune gradually in this many steps (linear schedule)")
    epochs: int = Field(
        0, ge=0, le=MAX_EPOCHS, description="fine-tuning epochs after each step but the last (0: none)"
    )


@register_stage("prune_channels")
class PruneChannels(Stage[PruneChannelsConfig]):
    """Remove output channels and neurons, updating every dependent layer (torch-pruning's DependencyGraph).

    Batch norms, the next layers' inputs, residual partners, concatenations and grouped convs follow
    the removed channels, so the model really gets smaller and faster. Iterative mode prunes in
    ``steps`` with ``epochs`` of fine-tuning in between (the shared training loop). The report lists
    every conv/linear layer's width before and after; the checkpoint's architecture diff rebuilds
    the narrower layers on load. ``head_ratio`` removes whole attention heads of timm and Hugging
    Face transformer blocks.

    Every step is proven exact (``details.exactness``): the pruned model must compute, on
    ``CHECK_SAMPLES`` inputs, what the model before it computes with the removed channels zeroed;
    otherwise the stage refuses, naming the first diverging layer, and leaves the model unchanged.
    The preflight runs the same removal on a throwaway copy, so such a model is refused before the
    baseline (and by ``compress validate --model``).
    """

    example = {"ratio": 0.5, "importance": "l1"}

    @classmethod
    def trains(cls, config: StageConfig) -> bool:
        return isinstance(config, PruneChannelsConfig) and config.epochs > 0 and config.steps > 1

    def preflight(self, state: State) -> None:
        """Refuse what cannot work before the baseline: reshapes into 5+ dimensions (torch-pruning
        fails or exhausts memory on them), then the removal itself on a throwaway copy at the
        configured ratio, proven exact, so a model whose dependency graph torch-pruning gets wrong
        is refused here and by ``compress validate --model``."""
        from compress_cli.checkpoint import copy_model
        from compress_cli.pruning import CHECK_SAMPLES, high_rank_reshapes, prune_channels

        c = self.config
        _check_labels(c.importance, state)
        found = high_rank_reshapes(state.model, _to(state.data.example_input(1), state.device))
        if found:
            raise StageError(
                f"cannot remove channels from this model: it reshapes feature maps into 5 or more "
                f"dimensions ({found[0]}{f', and {len(found) - 1} more' if len(found) > 1 else ''}; "
                "a channel shuffle or window partition), which torch-pruning's dependency graph cannot "
                "follow (it fails or exhausts memory). Use prune (unstructured), drop_layers, codebook "
                "or quantize on this model instead"
            )
        # the same removal on a copy; scores that need data are replaced by l1 (the graph is the same)
        prune_channels(
            copy_model(state.model),
            _to(state.data.example_input(1), state.device),
            importance=c.importance if c.importance in ("l1", "l2") else "l1",
            **_removal(c),
            check_inputs=_to(state.data.example_input(CHECK_SAMPLES), state.device),
        )

    def preview(self, state: State) -> list[str]:
        from compress_cli._utils.modules import matches_any, output_layers
        from compress_cli.pruning import layer_widths

        c = self.config
        widths = layer_widths(state.model)
        keep = set(output_layers(state.model, _to(state.data.example_input(1), state.device)))
        ignored = sorted(keep | {n for n in widths if matches_any(n, c.ignore)})
        lines = [
            f"{len(widths)} conv/linear layers, {sum(widths.values())} output channels; "
            f"importance {c.importance}, ratio {c.ratio} ({c.scope}), {c.steps} step(s)"
        ]
        lines.append("width kept: " + ", ".join(ignored))
        for glob, r in c.layer_ratios.items():
            hits = [n for n in widths if matches_any(n, [glob])]
            lines.append(
                f"{glob}: ratio {r} on {len(hits)} layer(s)" + ("" if hits else " (matches nothing)")
            )
        return lines

    def run(self, state: State) -> StageResult:
        from compress_cli.pruning import CHECK_SAMPLES, prune_channels
        from compress_cli.training import train

        c = self.config
        task = state.data.get_task()
        _check_labels(c.importance, state)
        before = sum(p.numel() for p in state.model.parameters())
        finetunes: list[dict[str, Any]] = []

        def between(step: int) -> None:
            res = train(state.model, state, c, label=f"{self.name} step {step}/{c.steps}")
            finetunes.append({"after_step": step, **res.summary()})

        def on_step(step: int, info: dict[str, Any]) -> None:
            left = info["channels"]
            state.ctx.listener.on_message(f"{self.name}: step {step}/{c.steps}, {left} channels left")

        calib = state.data.calibration() if c.importance in ("activation", "taylor") else []
        res = prune_channels(
            state.model,
            state.data.example_input(1),
            importance=c.importance,
            **_removal(c),
            steps=c.steps,
            calibration=calib,
            task=task,
            check_inputs=state.data.example_input(CHECK_SAMPLES),
            between_steps=between if c.epochs > 0 else None,
            on_step=on_step,
        )
        after = sum(p.numel() for p in state.model.parameters())
        total = sum(res.widths_before.values())
        state.edits.record(
            self.name,
            op="prune_channels",
            importance=c.importance,
            ratio=c.ratio,
            scope=c.scope,
            steps=c.steps,
            channels_removed=res.channels_removed,
            params_before=before,
            params_after=after,
        )
        changed = {n: w for n, w in res.width_table().items() if w[0] != w[1]}
        heads = {n: h for n, h in res.heads.items() if h[0] != h[1]}
        notes = (
            f"{res.channels_removed} of {total} channels removed in {len(changed)} layers "
            f"({c.importance}, {c.scope}); params {before:,} -> {after:,}"
        )
        if heads:
            notes += f"; heads removed in {len(heads)} attention layer(s)"
        if res.exactness is not None:
            notes += (
                f"; exact (max |diff| {res.exactness.max_abs_diff:.2g} on {res.exactness.samples} samples)"
            )
        return StageResult(
            notes=notes,
            details={
                "widths": res.width_table(),
                "channels_before": total,
                "channels_after": sum(res.widths_after.values()),
                "params_before": before,
                "params_after": after,
                "kept": res.ignored,
                "folded_masks": res.folded_masks,
                "steps": res.steps,
                "heads": res.heads,
                "exactness": res.exactness.as_dict() if res.exactness is not None else None,
                "finetune": finetunes,
            },
        )


def _to(inputs: Any, device: Any) -> Any:
    """Example inputs (a tensor, tuple or dict of them) on ``device``."""
    from compress_cli._utils.batches import to_device

    return to_device(inputs, device)


def _check_labels(importance: str, state: State) -> None:
    """StageError when ``importance: taylor`` needs labels the data does not have."""
    task = state.data.get_task()
    if importance == "taylor" and task.needs_labels and not state.data.labelled:
        raise StageError(
            f"importance 'taylor' back-propagates the {task.name} task's loss, which needs labelled "
            "data; use l1, l2 or activation, or task: fidelity (its loss compares with the original)"
        )


def _removal(c: PruneChannelsConfig) -> dict[str, Any]:
    """What to remove, as ``pruning.prune_channels`` takes it (the preflight's trial and the run)."""
    return {
        "ratio": c.ratio,
        "scope": c.scope,
        "layer_ratios": dict(c.layer_ratios),
        "max_ratio": c.max_ratio,
        "round_to": c.round_to,
        "ignore": c.ignore,
        "head_ratio": c.head_ratio,
    }

"""The ``codebook`` stage: Deep Compression weight sharing (per-layer k-means), optional centroid tuning."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from compress_cli.config.bounds import MAX_EPOCHS
from compress_cli.stages.base import Stage, StageConfig, StageResult
from compress_cli.stages.registry import register_stage
from compress_cli.state import State
from compress_cli.training import TrainOptions

Bits = Annotated[int, Field(ge=2, le=8)]


class CodebookConfig(StageConfig, TrainOptions):
    """Deep Compression weight sharing: per-layer k-means codebooks, optional centroid fine-tuning."""

    bits: Bits = Field(description="index width: 2**bits shared values per layer (2..8)")
    layers: dict[str, Bits] = Field(default_factory=dict, description="per-layer bits overrides {glob: bits}")
    include: list[str] = Field(
        default_factory=lambda: ["*"], description="module name globs to share (Linear/Conv)"
    )
    exclude: list[str] = Field(default_factory=list, description="module name globs to leave alone")
    iters: int = Field(100, ge=1, le=10000, description="k-means iterations at most")
    epochs: int = Field(0, ge=0, le=MAX_EPOCHS, description="centroid fine-tuning epochs (0: cluster only)")
    others: Literal["keep", "fp16", "bf16"] = Field(
        "keep",
        description="every other float parameter/buffer (biases, norms): kept, or rounded to "
        "float16/bfloat16 values at the end (stored in 2 bytes; the model stays float32)",
    )
    batchnorm: Literal["keep", "fold", "affine"] = Field(
        "keep",
        description="batch norms: keep; fold each into the conv before it first (the conv gets a bias, "
        "the BN becomes Identity: 4 fewer tensors per pair, but the folded weights are what gets shared, "
        "which can cost accuracy); affine: at the end, move the running statistics into the BN's weight "
        "and bias (running mean 0, variance 1 - eps: the same outputs in eval mode, 2 constant tensors "
        "that store in a few bytes)",
    )


@register_stage("codebook")
class Codebook(Stage[CodebookConfig]):
    """Deep Compression's trained quantization: k-means weight sharing at 2**bits values per layer.

    Each selected Linear/Conv layer's nonzero weights are clustered (1-D k-means, linear init
    over [min, max]) into ``2**bits`` centroids and replaced by them; zeros stay zero, so it
    composes with ``prune`` (whose masks it makes permanent). With ``epochs`` > 0 the centroids
    are then fine-tuned through the shared training loop: each centroid receives the summed
    gradient of the weights sharing it (a parametrization, see compress_cli/codebook.py), the
    other parameters train normally. The checkpoint stores each layer as ``bits``-bit indices
    plus its centroid table (plus the sparse positions); ``others: fp16`` also rounds the
    remaining float tensors (biases, norm layers) to float16 values, stored in 2 bytes. Nothing may
    train after this stage (it would break the sharing): it is the last weight-changing stage of a
    recipe.
    """

    example = {"bits": 4, "epochs": 1, "lr": 0.001, "max_steps_per_epoch": 2}

    @classmethod
    def trains(cls, config: StageConfig) -> bool:
        return getattr(config, "epochs", 0) > 0

    @classmethod
    def freezes(cls, config: StageConfig) -> bool:
        return True

    def _targets(self, state: State) -> tuple[list[tuple[str, Any]], dict[str, int]]:
        from compress_cli.errors import StageError
        from compress_cli.pruning import PRUNABLE, match_overrides

        cfg = self.config
        targets = state.select_modules(cfg.include, cfg.exclude, PRUNABLE)
        if not targets:
            raise StageError(f"no Linear/Conv layer matches include {cfg.include} / exclude {cfg.exclude}")
        overrides, unmatched = match_overrides(targets, cfg.layers)
        if unmatched:
            names = ", ".join(n for n, _ in targets)
            raise StageError(
                f"layers: {', '.join(map(repr, unmatched))} match no selected layer (selected: {names})"
            )
        return targets, {n: overrides.get(n, cfg.bits) for n, _ in targets}

    def preflight(self, state: State) -> None:
        """No Linear/Conv matches include/exclude, or a ``layers`` glob matches none: refused now
        (folding batch norms first keeps every layer's name)."""
        self._targets(state)

    def preview(self, state: State) -> list[str]:
        targets, bits = self._targets(state)
        return [f"{n} ({m.weight.numel()} weights): {bits[n]} bits" for n, m in targets]

    def run(self, state: State) -> StageResult:
        from compress_cli import codebook as C
        from compress_cli.pruning import apply_masks, make_permanent, masks
        from compress_cli.training import train

        cfg = self.config
        details: dict[str, Any] = {}
        if cfg.batchnorm == "fold":
            from compress_cli.quantization.fold import fold_batchnorm

            saved = masks(state.model)
            make_permanent(state.model)  # fold the effective (masked) weights
            training = state.model.training
            example = state.data.example_input(2)
            state.model, details["folded"] = fold_batchnorm(state.model, example)
            state.model.to(state.device).train(training)
            apply_masks(state.model, saved)  # zeros stay zeros through the folding and after it
        targets, bits = self._targets(state)
        make_permanent(state.model, only=[n for n, _ in targets])
        per: dict[str, dict[str, Any]] = {}
        for name, mod in targets:
            r = C.share_weights(mod, bits[name], cfg.iters)
            per[name] = {"bits": r.bits, "clusters": r.clusters, "nonzero": r.nonzero, "mse": r.mse}
            state.ctx.listener.on_step(self.name)
        details["layers"] = per
        if cfg.epochs > 0:
            for _, mod in targets:
                C.attach(mod)
            try:
                res = train(state.model, state, cfg, label=self.name)
            finally:
                for _, mod in targets:
                    C.detach(mod)
            details["finetune"] = res.summary()
            for name, mod in targets:
                per[name]["clusters"] = C.distinct_nonzero(mod)
        skip = {id(mod.weight) for _, mod in targets}
        if cfg.batchnorm == "affine":
            details["affine"], constants = C.absorb_batchnorm_stats(state.model)
            skip |= {id(t) for t in constants}
        if cfg.others != "keep":
            import torch

            details["rounded"] = C.round_others(
                state.model, skip, getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[cfg.others])
            )
        extra: dict[str, Any] = {"layers": dict(cfg.layers)} if cfg.layers else {}
        if cfg.batchnorm != "keep":
            extra["batchnorm"] = cfg.batchnorm
        if cfg.others != "keep":
            extra["others"] = cfg.others
        state.edits.record(self.name, op="codebook", bits=cfg.bits, **extra)
        kinds = sorted(set(bits.values()))
        notes = f"{len(targets)} layers shared at {'/'.join(map(str, kinds))} bits"
        if cfg.epochs > 0:
            notes += f", centroids fine-tuned {details['finetune']['epochs_run']} epoch(s)"
        return StageResult(notes=notes, details=details)

"""Snapshots of a run, one folder per completed stage under ``OUTPUT/stages``: what ``--resume``
continues from and what a guard reverts to.

A snapshot folder holds ``model/`` (the compressed checkpoint), ``state.json`` (hparams, edits,
transforms, model spec, the stage's report entry and config, the recipe digest) and, when pruning
masks are in force, ``masks.safetensors.xz`` (one bit per weight). While its stage runs, a folder
also holds ``train/NN.pt``, the mid-stage checkpoints of the stage's training (see
``training.train``); they go once the stage's snapshot is written.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress_cli.errors import UsageError
from compress_cli.report import Metrics, StageEntry
from compress_cli.state import TRAIN_CHECKPOINTS

if TYPE_CHECKING:
    from compress_cli.config.recipe import Recipe
    from compress_cli.stages.base import StageConfig
    from compress_cli.state import State

MASKS = "masks.safetensors.xz"  # next to a snapshot's state.json: the pruning masks in force
BASELINE = "00-baseline"


def top_digest(recipe: Recipe) -> str:
    """What a resumed run must share with the snapshot: model, data, seed, measurement."""
    d = recipe.model_dump(mode="json", include={"model", "data", "seed", "deterministic", "measure"})
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def stage_dump(cfg: StageConfig) -> dict[str, Any]:
    """A stage config as a snapshot records it (what --resume compares); ``checkpoint_every_s``, at
    any depth, is left out: how often a stage checkpoints never changes what it computes."""

    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k != "checkpoint_every_s"}
        if isinstance(v, list):
            return [strip(x) for x in v]
        return v

    return strip(cfg.model_dump(mode="json", exclude={"name", "on_violation"}))  # type: ignore[no-any-return]


def stage_key(recipe: Recipe, index: int) -> str:
    """What a mid-stage checkpoint of stage ``index`` (1-based) must match to be resumed from: the
    recipe's top digest, the stage's place and its config."""
    cfg = stage_dump(recipe.stages[index - 1])
    return (
        f"{index}-"
        + hashlib.sha256(
            json.dumps([top_digest(recipe), cfg], sort_keys=True, default=str).encode()
        ).hexdigest()[:16]
    )


class SnapshotStore:
    """The snapshot folders of one run of ``recipe`` under ``root`` (``OUTPUT/stages``)."""

    def __init__(self, root: Path, recipe: Recipe):
        self.root = root
        self.recipe = recipe

    @property
    def baseline_dir(self) -> Path:
        """The folder of the baseline (the model as loaded, measured before any stage)."""
        return self.root / BASELINE

    def stage_dir(self, index: int) -> Path:
        """The folder of stage ``index`` (1-based; 0 is the baseline)."""
        if index == 0:
            return self.baseline_dir
        return self.root / f"{index:02d}-{self.recipe.stages[index - 1].type}"

    def write(self, d: Path, state: State, **extra: Any) -> None:
        """Record in ``d`` what restoring needs besides ``d/model``: the masks and state.json."""
        import numpy as np
        import torch

        from compress_cli._utils.io import atomic_write_bytes, atomic_write_text
        from compress_cli.checkpoint.codec import encode_state_dict
        from compress_cli.pruning.unstructured import masks

        # the pruning masks in force: a resumed (or reverted-to) model must keep its zeros through
        # later training exactly as the uninterrupted run does; one bit per weight, entropy-coded
        held = masks(state.model)
        if held:
            packed = {k: torch.from_numpy(np.packbits(m.cpu().numpy().reshape(-1))) for k, m in held.items()}
            atomic_write_bytes(d / MASKS, encode_state_dict(packed)[0])
        else:
            (d / MASKS).unlink(missing_ok=True)

        payload = {
            "top_digest": top_digest(self.recipe),
            "hparams": state.hparams,
            "edits": state.edits.to_json(),
            "transforms": state.transforms,
            "model_spec": state.model_spec.model_dump(mode="json"),
            **extra,
        }
        atomic_write_text(d / "state.json", json.dumps(payload, indent=2, default=str))
        # the stage is complete: its snapshot supersedes the mid-stage checkpoints training left
        shutil.rmtree(d / TRAIN_CHECKPOINTS, ignore_errors=True)

    def restore(self, state: State, d: Path) -> None:
        """Make ``state`` what it was right after the snapshot in ``d``."""
        from compress_cli.checkpoint import restore_transforms
        from compress_cli.config.recipe import ModelConfig
        from compress_cli.sources.models import load_model_dir, trusted_sources
        from compress_cli.state import Edit, EditLog

        saved = json.loads((d / "state.json").read_text())
        model = load_model_dir(d / "model", trust_source=trusted_sources(self.recipe), apply_transforms=False)
        state.model = model.to(state.device)  # as the stage left it
        if (d / MASKS).is_file():
            import math

            import numpy as np
            import torch

            from compress_cli.checkpoint.codec import decode_state_dict
            from compress_cli.pruning.unstructured import apply_masks

            held = {}
            for key, bits in decode_state_dict((d / MASKS).read_bytes()).items():
                shape = state.model.get_parameter(key).shape  # the mask's tensor, a plain parameter now
                flat = np.unpackbits(bits.numpy())[: math.prod(shape)].astype(bool)
                held[key] = torch.from_numpy(flat).reshape(shape)
            apply_masks(state.model, held)
        state.hparams = dict(saved["hparams"])
        state.transforms = list(saved["transforms"])
        state.edits = EditLog(
            [Edit(e.pop("stage"), e.pop("op"), e) for e in (dict(x) for x in saved["edits"])]
        )
        state.model_spec = ModelConfig(**saved["model_spec"])
        state.runner = None
        restore_transforms(state)  # e.g. quantize: the int8 runtime and its runner

    def resume_point(self) -> tuple[int, list[StageEntry], Metrics] | None:
        """(last complete stage index, their report entries, baseline); None when there is no snapshot
        yet (not even the baseline's: the run starts from the beginning); a UsageError when the
        snapshots belong to a different recipe."""
        base = self.baseline_dir / "state.json"
        if not base.is_file():
            return None
        saved = json.loads(base.read_text())
        if saved.get("top_digest") != top_digest(self.recipe):
            raise UsageError(
                "--resume: the recipe's model, data, seed or measure section changed since the "
                "snapshot; run without --resume (with --force) to start over"
            )
        last, entries = 0, []
        for i, cfg in enumerate(self.recipe.stages, start=1):
            f = self.stage_dir(i) / "state.json"
            if not f.is_file():
                break
            snap = json.loads(f.read_text())
            if snap.get("stage") != stage_dump(cfg):
                changed = sorted(
                    k
                    for k in set(snap.get("stage", {})) | set(stage_dump(cfg))
                    if snap.get("stage", {}).get(k) != stage_dump(cfg).get(k)
                )
                raise UsageError(
                    f"--resume: stages[{i - 1}] ({cfg.type}) differs from its snapshot "
                    f"(changed: {', '.join(changed)}); run without --resume (with --force) to start over"
                )
            entries.append(StageEntry.model_validate(snap["entry"]))
            last = i
        stray = [
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and p.name[:2].isdigit() and int(p.name[:2]) > len(self.recipe.stages)
        ]
        if stray:
            raise UsageError(
                f"--resume: snapshots {', '.join(sorted(stray))} belong to stages the recipe no longer has"
            )
        return last, entries, Metrics.model_validate(saved["baseline"])

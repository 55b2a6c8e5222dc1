"""State passed from stage to stage: the model side (model, frozen original, data, device, found
hparams, edits) and, in ``State.ctx``, the run's services a stage may use (:class:`RunContext`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from compress_cli._utils.modules import select_modules
from compress_cli.events import RunListener

if TYPE_CHECKING:
    import torch
    from torch import nn

    from compress_cli.config.recipe import ModelConfig, Recipe
    from compress_cli.runtime.runners import Runner
    from compress_cli.sources.data.bundle import DataBundle
    from compress_cli.stages.base import Stage, StageResult


#: the folder, inside a stage's snapshot folder, of its mid-stage (training) checkpoints
TRAIN_CHECKPOINTS = "train"


@dataclass
class Edit:
    """One structural or numerical change a stage made (recorded in the model's manifest)."""

    stage: str
    op: str
    details: dict[str, Any]


@dataclass
class EditLog:
    """The edits of a run, in order."""

    items: list[Edit] = field(default_factory=list)

    def record(self, stage: str, op: str | None = None, **details: Any) -> None:
        """Append an edit by ``stage`` (``op`` defaults to the stage's name)."""
        self.items.append(Edit(stage, op or stage, details))

    def to_json(self) -> list[dict[str, Any]]:
        """The edits as the manifest and the report store them."""
        return [{"stage": e.stage, "op": e.op, **e.details} for e in self.items]


class StopSource(Protocol):
    """Whether the run was asked to stop (a signal, the time budget); the engine's StopController."""

    def should_stop(self) -> bool:
        """True once a signal arrived or the time budget is spent: finish the current step and return."""
        ...

    def handling_signals(self, *, interrupt: bool = False) -> AbstractContextManager[None]:
        """SIGINT/SIGTERM handled inside (main thread only; a no-op when already handling):
        ``interrupt=False`` turns the first signal into ``should_stop()``, ``interrupt=True`` raises
        KeyboardInterrupt at once and leaves a handler somebody else installed in charge."""
        ...


class StageRunner(Protocol):
    """Runs one stage the way the pipeline does (``compress_cli.engine.stage_run.run_stage``)."""

    def __call__(
        self, stage: Stage[Any], state: State, *, seed: int | None = None, where: str = "stages"
    ) -> StageResult: ...


@dataclass
class RunContext:
    """The run's services a stage may use besides the model. The engine builds one per run; an hpo
    trial derives its own with :meth:`for_trial`, sharing the stop source and the stage runner."""

    output_dir: Path  # where a stage writes its files (model.onnx, plots); an hpo trial's own folder
    stop: StopSource
    run_stage: StageRunner  # how nested stages (hpo trials) run: seeded, checked, errors located
    listener: RunListener = field(default_factory=RunListener, repr=False)
    stage_dir: Path | None = None  # the running stage's snapshot folder (for epoch checkpoints)
    #: what identifies the running stage (recipe and stage config, set by the engine with stage_dir);
    #: training.train checkpoints into stage_dir/train only while it is set, and resumes from a
    #: checkpoint only when it matches (None in hpo trials: a trial starts over)
    stage_key: str | None = None
    _train_calls: dict[str, int] = field(default_factory=dict, repr=False)
    #: called by training.train after every epoch with (epoch, metrics), after its own on_epoch
    #: (hpo reports validation accuracy to its pruner this way, through any wrapped stage)
    epoch_callbacks: list[Callable[[int, dict[str, float]], None]] = field(default_factory=list, repr=False)

    def should_stop(self) -> bool:
        """True once the run was asked to stop (see :class:`StopSource`)."""
        return self.stop.should_stop()

    def for_trial(self, folder: Path, listener: RunListener) -> RunContext:
        """A context for an hpo trial: writes into ``folder``, reports through ``listener``, no
        epoch callbacks of the enclosing run, no mid-stage checkpoints."""
        return replace(
            self, output_dir=folder, stage_dir=folder, listener=listener, epoch_callbacks=[], stage_key=None
        )

    def next_train_checkpoint(self) -> tuple[Path, str] | None:
        """(file, key) for the running stage's next ``train`` call's mid-stage checkpoint, or None
        when this context does not checkpoint. The n-th call of a stage gets ``stage_dir/train/NN.pt``
        whatever process runs it, so a resumed stage finds the checkpoints of its first run."""
        if self.stage_dir is None or self.stage_key is None:
            return None
        where = str(self.stage_dir)
        n = self._train_calls.get(where, 0)
        self._train_calls[where] = n + 1
        return self.stage_dir / TRAIN_CHECKPOINTS / f"{n:02d}.pt", f"{self.stage_key}/{n}"


@dataclass
class State:
    """What a stage reads and changes: the model and everything needed to rebuild and measure it."""

    model: nn.Module
    #: the model as loaded, frozen: the default teacher and the baseline; a big one waits in a file
    #: (see engine.setup.build_state). Read it with ``original_model()``.
    original: nn.Module | Path
    data: DataBundle
    device: torch.device
    recipe: Recipe
    model_spec: ModelConfig  # how to rebuild the current architecture's base (changes on student swap)
    ctx: RunContext = field(repr=False)
    hparams: dict[str, Any] = field(default_factory=dict)
    edits: EditLog = field(default_factory=EditLog)
    #: load-time transforms a stage needs replayed by load() (e.g. quantization); see checkpoint
    transforms: list[dict[str, Any]] = field(default_factory=list)
    runner: Any = None  # the runtime.runners.Runner that measures the model; None = torch eager
    seed: int = 0

    def current_runner(self) -> Runner:
        """The runner the model is measured through: the one a stage installed, else torch eager."""
        from compress_cli.runtime.runners import EagerRunner

        return self.runner if self.runner is not None else EagerRunner(self.model, self.device)

    def original_model(self) -> nn.Module:
        """The model as loaded (eval mode, no gradients); read back from its file for each call when
        it waits on disk, so a caller holds it only as long as it needs it."""
        if not isinstance(self.original, Path):
            return self.original
        import torch

        model = torch.load(self.original, map_location=self.device, weights_only=False).eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def select_modules(
        self, include: Iterable[str] = ("*",), exclude: Iterable[str] = (), kinds: tuple[type, ...] = ()
    ) -> list[tuple[str, nn.Module]]:
        """:func:`select_modules` over the state's model."""
        return select_modules(self.model, include, exclude, kinds)

    def resolve(self, value: Any, key: str, default: Any = None) -> Any:
        """Turn ``auto`` into the value an earlier stage found (lr_find, batch_size_find)."""
        if value == "auto":
            if key in self.hparams:
                return self.hparams[key]
            if default is not None:
                return default
            from compress_cli.errors import StageError

            raise StageError(f"{key}: 'auto' but no earlier stage found a value")
        return value


def save_snapshot(state: State, directory: Path) -> int:
    """Write the state's model as a compressed model directory (the format ``compress_cli.load``
    reads: architecture diff, edits, load transforms, encoded weights); returns its bytes on disk."""
    from compress_cli.checkpoint import save_model
    from compress_cli.sources.models import build_from_source

    spec = state.model_spec.model_dump(mode="json")
    inputs = None
    if not state.data.input_shape:  # structured inputs: the manifest says what the model takes
        from compress_cli.runtime.inputs import InputSpec

        inputs = InputSpec.from_example(state.data.example_input(1), state.model).to_json()
    size = save_model(
        state.model,
        directory,
        base=build_from_source(spec),
        model_spec=spec,
        input_spec=inputs,
        input_shape=list(state.data.input_shape),
        num_classes=state.data.num_classes if state.data.labelled else None,
        edits=state.edits.to_json(),
        transforms=state.transforms,
    )
    from compress_cli.sources.hf import copy_tokenizer, tokenizer_dir

    tokenizer = tokenizer_dir(spec.get("source"))
    if tokenizer is not None:  # a transformer's directory is deployable with its tokenizer
        copy_tokenizer(tokenizer, Path(directory))
    return size

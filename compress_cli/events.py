"""Typed progress events of a run: the :class:`RunListener` hooks (Lightning's ``Callback`` shape).

The engine, the stages and the algorithms they call report progress by calling a hook on
``state.ctx.listener``; the CLI's renderer (``compress_cli.cli.render``) overrides every hook and is
the only place that prints. A hook is a typed method, not a free string, so an event that nobody
renders is a type error instead of a silently dropped line (``info``/``stage_info`` events from the
prune and quantize stages were never shown under the old ``emit(kind: str, **kw)`` protocol).

This module sits below the algorithm packages (training, pruning, hpo) that emit, so they can
import it; it imports only the report models.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compress_cli.report import Metrics, Report, StageEntry


class RunListener:
    """Receives a run's progress. Every hook is a no-op here: subclass and override what you show."""

    def on_setup(self, recipe: str, device: str, output: Path) -> None:
        """The model and data are about to load for ``recipe`` on ``device``, writing to ``output``."""

    def on_message(self, text: str) -> None:
        """One line for the user (a stage's progress note, a signal received, a trial's result)."""

    def on_baseline(self, metrics: Metrics) -> None:
        """The loaded model was measured (before any stage)."""

    def on_stage_start(self, index: int, total: int, name: str, type_name: str) -> None:
        """Stage ``index`` (1-based) of ``total`` starts."""

    def on_stage_end(self, entry: StageEntry) -> None:
        """A stage finished and was measured; ``entry`` is its report entry."""

    def on_epoch_start(self, label: str, epoch: int, epochs: int, steps: int) -> None:
        """A training epoch (1-based ``epoch`` of ``epochs``) of ``steps`` optimizer steps starts."""

    def on_step(self, label: str) -> None:
        """One unit of work of ``label`` is done (an optimizer step, a layer, a scan point)."""

    def on_epoch_end(self, label: str, metrics: dict[str, float]) -> None:
        """A training epoch ended: ``epoch``, ``train_loss``, ``lr`` and, when validated,
        ``val_accuracy`` and ``val_loss``."""

    def on_measure_start(self, samples: int) -> None:
        """Measuring starts over a split of ``samples`` samples."""

    def on_eval_step(self, samples: int) -> None:
        """``samples`` more samples were evaluated."""

    def on_measure_end(self, metrics: Metrics) -> None:
        """Measuring ended with ``metrics``."""

    def on_done(self, report: Report) -> None:
        """The run finished and wrote ``report``."""


class Listeners(RunListener):
    """Several listeners as one: every hook goes to each of them, in order (the CLI's renderer and a
    tracker both follow a run). The hooks are made from :class:`RunListener`'s below, so a hook added
    there is forwarded too."""

    def __init__(self, *listeners: RunListener) -> None:
        self.listeners = listeners


def _forward(name: str) -> Any:
    def hook(self: Listeners, *args: Any, **kwargs: Any) -> None:
        for listener in self.listeners:
            getattr(listener, name)(*args, **kwargs)

    hook.__name__ = hook.__qualname__ = name
    hook.__doc__ = f"``{name}`` of every listener, in order."
    return hook


for _name in [n for n in vars(RunListener) if n.startswith("on_")]:
    setattr(Listeners, _name, _forward(_name))

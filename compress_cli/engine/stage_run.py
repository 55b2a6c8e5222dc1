"""Running one stage, the same way for every loop that runs stages: the pipeline (rank 0 and the
other torchrun ranks), hpo trials (through ``state.ctx.run_stage``) and the coverage sweep."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from compress_cli.engine.setup import check_finite, release_memory, seed_everything
from compress_cli.errors import CompressError, StageError

if TYPE_CHECKING:
    from compress_cli.stages.base import Stage, StageResult
    from compress_cli.state import State


def run_stage(
    stage: Stage[Any],
    state: State,
    *,
    seed: int | None = None,
    where: str = "stages",
    on_error: Callable[[Exception], None] | None = None,
) -> StageResult:
    """Run ``stage`` on ``state``: seeded with ``seed`` first (None: the caller's generators go on),
    then the freed memory handed back and the weights checked finite.

    An error comes out located at the stage's place in the recipe, ``{where}[i] (type): ...`` with
    ``i = stage.index - 1`` (``Stage.index`` is 1-based everywhere): a CompressError keeps its class
    with its problems prefixed, anything else becomes a StageError naming the exception's type.
    An OSError writing into the run's output (a mid-stage checkpoint on a full disk) passes
    through for the run's one ``output OUT: ...`` line. ``on_error`` sees the stage's own exception
    first (the pipeline writes its partial report with it). KeyboardInterrupt passes through untouched.
    """
    if seed is not None:
        seed_everything(seed, state.recipe.deterministic)
    at = f"{where}[{stage.index - 1}] ({stage.config.type})"
    try:
        result = stage.run(state)
        release_memory()
        check_finite(state)
    except CompressError as e:
        if on_error is not None:
            on_error(e)
        e.problems = [f"{at}: {p}" for p in e.problems]
        raise
    except Exception as e:
        if on_error is not None:
            on_error(e)
        if isinstance(e, OSError) and _in_output(e, state):
            raise  # writing the output failed (disk full, ...): the run says so in its one line
        raise StageError(f"{at}: {type(e).__name__}: {e}") from e
    return result


def _in_output(e: OSError, state: State) -> bool:
    """Whether ``e`` happened writing a file in the run's output (a mid-stage checkpoint, ...)."""
    from pathlib import Path

    if not e.filename or e.errno is None:
        return False
    try:
        return Path(str(e.filename)).resolve().is_relative_to(state.ctx.output_dir.resolve())
    except (OSError, ValueError):
        return False

"""run_stage: the one way every loop runs a stage (1-based index, errors located alike)."""

from __future__ import annotations

import pytest
import torch

from compress_cli.engine.stage_run import run_stage
from compress_cli.errors import RecipeError, StageError
from compress_cli.stages.base import Stage, StageConfig, StageResult
from compress_cli.testing import tiny_state


class BoomConfig(StageConfig):
    """Test-only stage."""


class Boom(Stage[BoomConfig]):
    """Test-only stage: raises what it is given, or draws a random number and poisons the weights."""

    type_name = "boom"
    error: BaseException | None = None
    drawn: torch.Tensor | None = None

    def run(self, state):
        if self.error is not None:
            raise self.error
        self.drawn = torch.rand(3)
        with torch.no_grad():
            next(state.model.parameters()).fill_(float("nan"))
        return StageResult()


def boom(index: int, error: BaseException | None) -> Boom:
    stage = Boom(BoomConfig(type="boom"), index)
    stage.error = error
    return stage


@pytest.fixture
def state(tmp_path):
    return tiny_state(tmp_path=tmp_path)


def test_errors_are_located_at_the_stage_and_keep_their_class(state):
    seen = []
    with pytest.raises(RecipeError) as e:
        run_stage(boom(3, RecipeError("bad value")), state, on_error=seen.append)
    assert e.value.problems == ["stages[2] (boom): bad value"]
    assert str(seen[0]) == "bad value"  # the stage's own error, before locating
    with pytest.raises(StageError) as e2:
        run_stage(boom(2, ValueError("nope")), state, where="stages[0].stages")
    assert e2.value.problems == ["stages[0].stages[1] (boom): ValueError: nope"]
    with pytest.raises(KeyboardInterrupt):
        run_stage(boom(1, KeyboardInterrupt()), state)


def test_the_stage_draws_from_the_seed_and_its_weights_are_checked_finite(state):
    stage = boom(1, None)
    with pytest.raises(StageError) as e:
        run_stage(stage, state, seed=5)
    assert e.value.problems[0].startswith("stages[0] (boom): weights contain NaN/inf")
    torch.manual_seed(5)
    assert stage.drawn is not None and torch.equal(stage.drawn, torch.rand(3))

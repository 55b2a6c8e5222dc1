"""Every event a run emits reaches the terminal: the renderer overrides every RunListener hook, and
the prune/quantize progress lines (once emitted as kinds nobody rendered) show up in `compress run`."""

from __future__ import annotations

from typer.testing import CliRunner

from compress_cli.cli import app
from compress_cli.cli.render import Renderer
from compress_cli.events import RunListener


def test_the_renderer_overrides_every_hook():
    hooks = [name for name in vars(RunListener) if name.startswith("on_")]
    assert hooks and [h for h in hooks if h not in vars(Renderer)] == []


def test_stage_messages_reach_the_terminal(write_recipe):
    path = write_recipe(
        stages=[
            {"type": "prune", "sparsity": 0.3, "sensitivity": {"ratios": [0.5], "max_batches": 1}},
            {"type": "prune", "sparsity": 0.5, "schedule": {"steps": 2, "finetune_epochs": 1}},
            {"type": "quantize", "scheme": "int8_static", "calibration_batches": 2},
        ],
        measure={"latency": None, "macs": False},
    )
    res = CliRunner().invoke(app, ["run", str(path)])
    assert res.exit_code == 0, res.output
    for line in (
        "prune: sensitivity scan of",  # once an unrendered "info" event
        "prune: step 2/2, sparsity",
        "quantize: int8_static",  # once an unrendered "stage_info" event
        "calibrating on 2 batch(es)",
        "baseline: top-1",
        "stage 3/3 quantize",
        "quantize done in",
    ):
        assert line in res.output, line


def test_a_problem_with_brackets_is_printed_as_written(capsys):
    """Problems are plain text: ``exclude: [module globs]`` must not be eaten as rich markup."""
    from compress_cli.cli.render import problems
    from compress_cli.errors import StageError

    problems(StageError("try exclude: [the classifier] or [red]x[/red]"), debug=False)
    err = capsys.readouterr().err
    assert "exclude: [the classifier]" in err and "[red]x[/red]" in err

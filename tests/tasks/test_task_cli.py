"""``compress tasks``: lists every task with its metrics, primary metric and direction, and label
needs; describes one; stays torch-free like the rest of the command line's cheap commands."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from compress_cli.cli import app
from compress_cli.tasks import task_classes

runner = CliRunner()


def test_every_task_type_of_the_recipe_format_is_registered():
    from compress_cli.config.recipe import TASK_TYPES

    assert set(task_classes()) == set(TASK_TYPES)


def test_tasks_lists_every_task():
    res = runner.invoke(app, ["tasks"])
    assert res.exit_code == 0, res.output
    for name in (*task_classes(), "custom"):
        assert name in res.output
    assert "r2 (higher is better)" in res.output and "miou (higher is better)" in res.output
    assert "not needed" in res.output  # fidelity and embedding work without labels


def test_tasks_describes_one():
    res = runner.invoke(app, ["tasks", "segmentation"])
    assert res.exit_code == 0, res.output
    assert "miou (primary)" in res.output and "pixel_accuracy" in res.output
    assert "ignore_index" in res.output and "255" in res.output and "needs labels" in res.output
    res = runner.invoke(app, ["tasks", "regression"])
    assert "mse" in res.output and "lower is better" in res.output and "task.kwargs: none" in res.output
    res = runner.invoke(app, ["tasks", "custom"])
    assert res.exit_code == 0 and "check_output" in res.output and "CONTRIBUTING.md" in res.output


def test_unknown_task_is_a_located_error():
    res = runner.invoke(app, ["tasks", "segmentaton"])
    assert res.exit_code == 2
    assert "unknown task 'segmentaton' (did you mean 'segmentation'?)" in res.output


def test_tasks_imports_no_torch():
    code = (
        "import sys; from typer.testing import CliRunner; from compress_cli.cli import app;"
        "r = CliRunner().invoke(app, ['tasks']); r2 = CliRunner().invoke(app, ['tasks', 'embedding']);"
        "print(r.exit_code, r2.exit_code, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "0", "False"]

"""The commands of ``compress`` (Typer): they parse arguments, call the package, and leave every
line of output to ``compress_cli.cli.render``. The only module that calls exit."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

#: OpenMP threads that finish their work sleep at once instead of spinning: on a machine where
#: other work runs, spinning threads take the cores from the ones with work and a 0.4 ms forward
#: pass takes hundreds of ms (benchmarks/RESULTS.md, "Overhead"). OpenMP reads it when torch loads,
#: so it is set here, before anything imports torch, and only when the user has not chosen one.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ["COMPRESS_SET_OMP_WAIT_POLICY"] = "1"  # the report says who chose it

import typer  # noqa: E402

from compress_cli.cli import render  # noqa: E402
from compress_cli.errors import CompressError, StageError  # noqa: E402
from compress_cli.events import Listeners  # noqa: E402

if TYPE_CHECKING:
    from compress_cli.tracking import MlflowTracker

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Make PyTorch models smaller and faster, and tune them, from YAML recipes.",
    pretty_exceptions_enable=False,
)
TRUST_HELP = "let the model directory in model.source / model.checkpoint run the code its manifest names"


def _fail(e: CompressError, debug: bool) -> NoReturn:
    render.problems(e, debug)
    raise typer.Exit(e.exit_code)


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="recipe YAML file"),
    output: str | None = typer.Option(
        None, "--output", "-o", help="output directory (default from the recipe)"
    ),
    device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:N | mps (overrides the recipe)"),
    set_: list[str] = typer.Option([], "--set", help="override a recipe value: key.path=value (repeatable)"),
    force: bool = typer.Option(
        False, "--force", help="replace a non-empty output directory (never one a live run holds)"
    ),
    resume: bool = typer.Option(
        False, "--resume", help="continue from the last complete stage snapshot (none yet: start afresh)"
    ),
    trust_source: bool = typer.Option(False, "--trust-source", help=TRUST_HELP),
    as_json: bool = typer.Option(
        False, "--json", help="print the final report as JSON on stdout (nothing else)"
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
    track: str | None = typer.Option(
        None,
        "--track",
        help="log the run to MLflow: mlflow://HOST:PORT, http(s)://..., file:DIR, sqlite:///FILE "
        "(sets tracking.mlflow.uri)",
    ),
) -> None:
    """Run a recipe: compress and tune the model, write the checkpoint and the report."""
    from compress_cli.engine.run import execute_recipe
    from compress_cli.runtime.distributed import env_rank
    from compress_cli.stages.registry import load_recipe
    from compress_cli.tracking import finishing, tracker_for

    overrides = (
        list(set_) + ([f"device={device}"] if device else []) + ([f"output={output}"] if output else [])
    ) + (["model.trust_source=true"] if trust_source else [])
    overrides += [f"tracking.mlflow.uri={track}"] if track else []
    secondary = env_rank() != 0  # under torchrun only rank 0 shows progress and results (errors: every rank)
    renderer = render.Renderer(render.err, quiet or secondary or as_json and not sys.stderr.isatty())
    tracker: MlflowTracker | None = None
    try:
        r, raw = load_recipe(recipe, overrides)
        where = f"--track {track}" if track else raw.where(("tracking", "mlflow"))
        tracker = None if secondary else tracker_for(r, where, resume=resume, notify=renderer.on_message)
        with finishing(tracker):
            listener = renderer if tracker is None else Listeners(renderer, tracker)
            report = execute_recipe(r, force=force, listener=listener, resume=resume)
    except CompressError as e:
        renderer.stop()
        if e.exit_code == 130:
            e.problems.append(
                f"to resume: run the same command again with --resume (compress run {recipe} ... --resume)"
            )
        _fail(e, debug)
    except KeyboardInterrupt:
        renderer.stop()
        render.interrupted()
        raise typer.Exit(130) from None
    renderer.stop()
    if secondary:
        return
    if as_json:
        render.json_document(report.to_dict())
        return
    if not quiet:
        render.run_result(report)
        if tracker is not None and tracker.run_url:
            render.tracked(tracker.run_url)


@app.command()
def validate(
    recipe: Path = typer.Argument(..., help="recipe YAML file"),
    set_: list[str] = typer.Option([], "--set", help="override a recipe value: key.path=value"),
    model: bool = typer.Option(False, "--model", help="also load the model and show what each stage touches"),
    trust_source: bool = typer.Option(False, "--trust-source", help=TRUST_HELP),
    show: bool = typer.Option(
        False, "--show", help="print the recipe as merged (extends: bases, --set) on stdout"
    ),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Check a recipe without running it (no model is loaded unless --model)."""
    from compress_cli.stages.registry import load_recipe

    try:
        r, raw = load_recipe(recipe, list(set_) + (["model.trust_source=true"] if trust_source else []))
        if show:
            render.merged_recipe(raw.data)
        render.validated(recipe, r.name, [s.type for s in r.stages], stderr=show)
        if model:
            from compress_cli.cli.dryrun import dry_run

            lines, refused = dry_run(r)
            render.lines(lines)
            if refused:
                raise StageError(refused)
    except CompressError as e:
        _fail(e, debug)


@app.command()
def stages(name: str | None = typer.Argument(None, help="a stage type to describe")) -> None:
    """List the registered stages, or describe one stage's parameters."""
    from compress_cli.stages.registry import get_stage, list_stages

    try:
        if name is None:
            render.stage_list([(n, _first_line(get_stage(n).__doc__)) for n in list_stages()])
            return
        cls = get_stage(name)
        parameters = []
        for fname, f in cls.config_class.model_fields.items():
            if fname == "type":
                continue
            ann = getattr(f.annotation, "__name__", None) or str(f.annotation).replace("typing.", "")
            default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
            parameters.append((fname, ann, default, f.description or ""))
        render.stage_help(name, (cls.__doc__ or "").strip(), parameters)
    except CompressError as e:
        _fail(e, False)


@app.command()
def tasks(name: str | None = typer.Argument(None, help="a task type to describe")) -> None:
    """List the tasks (metrics, primary metric and its direction, labels), or describe one task."""
    from compress_cli.errors import RecipeError, did_you_mean
    from compress_cli.tasks.registry import PROTOCOL, task_classes

    classes = task_classes()
    if name is None:
        first = ("classification", "fidelity")  # the default, and the one any model can use
        render.task_list([classes[n].info() for n in sorted(classes, key=lambda n: (n not in first, n))])
        return
    if name == "custom":
        render.custom_task_help(list(PROTOCOL))
        return
    if name not in classes:
        _fail(RecipeError(f"unknown task {name!r}{did_you_mean(name, [*classes, 'custom'])}"), False)
    render.task_help(classes[name].info())


@app.command()
def schema() -> None:
    """Print the JSON Schema of the recipe format (for yaml-language-server)."""
    from compress_cli.stages.registry import json_schema

    render.schema(json_schema())


@app.command()
def inspect(
    path: Path = typer.Argument(..., help="checkpoint file or compressed model directory"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Params, nonzeros, sparsity, size and per-layer summary of a checkpoint or model directory."""
    from compress_cli.cli.inspection import inspect_path

    try:
        info = inspect_path(path)
    except CompressError as e:
        _fail(e, debug)
    render.inspection(path, info)


@app.command()
def compare(
    run_dirs: list[Path] = typer.Argument(..., help="run directories (each with a report.json)"),
    out_dir: Path = typer.Option(Path("."), "--out", help="where compare.md and compare.png go"),
    as_json: bool = typer.Option(False, "--json", help="print the rows as JSON on stdout (nothing else)"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Compare runs: one table of their final results and one Pareto plot (metric vs size, latency)."""
    from compress_cli.cli.compare import public_rows, write_compare

    try:
        rows, files = write_compare(run_dirs, out_dir)
    except CompressError as e:
        _fail(e, debug)
    if as_json:
        render.json_document({"runs": public_rows(rows), "files": [str(f) for f in files]})
        return
    render.compare_table(rows, files)


@app.command()
def bench(
    run_dir: Path = typer.Argument(..., help="output directory of a finished run"),
    device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:N | mps (overrides the recipe)"),
    no_write: bool = typer.Option(False, "--no-write", help="only print; leave report.json/md as they are"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON on stdout (nothing else)"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Re-measure a finished run's speedup (original vs final, paired) on this machine, now."""
    from compress_cli.engine.bench import bench_run

    try:
        result = bench_run(run_dir, write=not no_write, device=device)
    except CompressError as e:
        _fail(e, debug)
    if as_json:
        render.json_document(result)
        return
    render.bench_result(result, written=not no_write)


def _first_line(doc: str | None) -> str:
    return doc.strip().splitlines()[0] if doc else ""


def main() -> None:
    """The ``compress`` console script."""
    app()

"""The command line. The ONLY module that prints to the terminal or calls exit."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from compress_cli.errors import CompressError, StageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Make PyTorch models smaller and faster, and tune them, from YAML recipes.",
    pretty_exceptions_enable=False,
)
err = Console(stderr=True, highlight=False)
out = Console(highlight=False)
TRUST_HELP = "let the model directory in model.source / model.checkpoint run the code its manifest names"
if not out.is_terminal:
    out.width = max(out.width, 150)


def _fail(e: CompressError, debug: bool) -> None:
    if debug:
        import traceback

        traceback.print_exception(e)
    for p in e.problems:
        err.print(f"[red]error:[/red] {p}", markup=True, soft_wrap=True)
    raise typer.Exit(e.exit_code)


class Renderer:
    """Turns pipeline events into rich progress bars and lines on stderr."""

    def __init__(self, console: Console, quiet: bool):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.c = console
        self.quiet = quiet
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            transient=True,
            disable=quiet,
        )
        self.task: Any = None

    def __call__(self, kind: str, **kw: Any) -> None:
        if self.quiet:
            return
        p = self.progress
        if kind == "setup":
            self.c.print(f"[bold]compress[/bold] {kw['recipe']} on {kw['device']} → {kw['output']}")
            p.start()
        elif kind == "stage_start":
            self.c.print(f"[cyan]stage {kw['index']}/{kw['total']}[/cyan] {kw['name']}")
        elif kind == "epoch_start":
            self._new(f"  {kw['label']} epoch {kw['epoch']}/{kw['epochs']}", kw["steps"])
        elif kind == "step" and self.task is not None:
            p.advance(self.task)
        elif kind == "epoch_end":
            self._done()
            extra = f" val {kw['val_accuracy'] * 100:.2f}%" if "val_accuracy" in kw else ""
            self.c.print(f"  {kw['label']} epoch {kw['epoch']}: loss {kw['train_loss']:.4f}{extra}")
        elif kind == "measure_start":
            self._new("  measuring", kw["samples"])
        elif kind == "eval_step" and self.task is not None:
            p.advance(self.task, kw["n"])
        elif kind == "measure_end":
            self._done()
        elif kind == "message":
            self.c.print(f"  {kw['text']}")
        elif kind == "done":
            p.stop()

    def _new(self, desc: str, total: int) -> None:
        self._done()
        self.task = self.progress.add_task(desc, total=total)

    def _done(self) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None

    def stop(self) -> None:
        self._done()
        self.progress.stop()


def report_table(report: dict[str, Any]) -> Table:
    from compress_cli.report import COLUMNS, rows

    t = Table(title=f"{report['recipe']} ({report['device']})")
    for name, _ in COLUMNS:
        t.add_column(name, justify="left" if name in ("stage", "runtime") else "right")
    for r in rows(report):
        t.add_row(*r)
    return t


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="recipe YAML file"),
    output: str | None = typer.Option(
        None, "--output", "-o", help="output directory (default from the recipe)"
    ),
    device: str | None = typer.Option(None, help="auto | cpu | cuda | cuda:N | mps (overrides the recipe)"),
    set_: list[str] = typer.Option([], "--set", help="override a recipe value: key.path=value (repeatable)"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty output directory"),
    resume: bool = typer.Option(False, "--resume", help="continue from the last complete stage snapshot"),
    trust_source: bool = typer.Option(False, "--trust-source", help=TRUST_HELP),
    as_json: bool = typer.Option(
        False, "--json", help="print the final report as JSON on stdout (nothing else)"
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress output"),
    debug: bool = typer.Option(False, "--debug", help="show tracebacks"),
) -> None:
    """Run a recipe: compress and tune the model, write the checkpoint and the report."""
    from compress_cli.engine.run import run_recipe
    from compress_cli.runtime.distributed import env_rank
    from compress_cli.stages.registry import load_recipe

    overrides = (
        list(set_) + ([f"device={device}"] if device else []) + ([f"output={output}"] if output else [])
    ) + (["model.trust_source=true"] if trust_source else [])
    secondary = env_rank() != 0  # under torchrun only rank 0 shows progress and results (errors: every rank)
    renderer = Renderer(err, quiet or secondary or as_json and not sys.stderr.isatty())
    try:
        r, _ = load_recipe(recipe, overrides)
        report = run_recipe(r, force=force, emit=renderer, resume=resume)
    except CompressError as e:
        renderer.stop()
        if e.exit_code == 130:
            e.problems.append(
                f"to resume: run the same command again with --resume (compress run {recipe} ... --resume)"
            )
        _fail(e, debug)
    except KeyboardInterrupt:
        renderer.stop()
        err.print("[red]interrupted[/red]")
        raise typer.Exit(130) from None
    renderer.stop()
    if secondary:
        return
    if as_json:
        sys.stdout.write(json.dumps(report, default=str) + "\n")
        return
    if not quiet:
        out.print(report_table(report))
        out.print(f"model: {report['output']}/model · report: {report['output']}/report.md")


@app.command()
def validate(
    recipe: Path = typer.Argument(..., help="recipe YAML file"),
    set_: list[str] = typer.Option([], "--set", help="override a recipe value: key.path=value"),
    model: bool = typer.Option(False, "--model", help="also load the model and show what each stage touches"),
    trust_source: bool = typer.Option(False, "--trust-source", help=TRUST_HELP),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Check a recipe without running it (no model is loaded unless --model)."""
    from compress_cli.stages.registry import load_recipe

    try:
        r, _ = load_recipe(recipe, list(set_) + (["model.trust_source=true"] if trust_source else []))
        out.print(
            f"[green]ok[/green] {recipe}: {r.name}, {len(r.stages)} stage(s): "
            + ", ".join(s.type for s in r.stages)
        )
        if model:
            from compress_cli.cli.dryrun import dry_run

            lines, refused = dry_run(r)
            for line in lines:
                out.print(line)
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
            t = Table(title="stages")
            t.add_column("type")
            t.add_column("description")
            for n in list_stages():
                cls = get_stage(n)
                t.add_row(n, (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "")
            out.print(t)
            return
        cls = get_stage(name)
        out.print(f"[bold]{name}[/bold]: {(cls.__doc__ or '').strip()}")
        t = Table()
        for c in ("parameter", "type", "default", "description"):
            t.add_column(c)
        for fname, f in cls.config_class.model_fields.items():
            if fname == "type":
                continue
            ann = getattr(f.annotation, "__name__", None) or str(f.annotation).replace("typing.", "")
            default = "required" if f.is_required() else repr(f.get_default(call_default_factory=True))
            t.add_row(fname, ann, default, f.description or "")
        out.print(t)
    except CompressError as e:
        _fail(e, False)


@app.command()
def schema() -> None:
    """Print the JSON Schema of the recipe format (for yaml-language-server)."""
    from compress_cli.stages.registry import json_schema

    sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")


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
    from compress_cli.report import human_bytes

    out.print(f"[bold]{path}[/bold]: {info['kind']}, {human_bytes(info['size_bytes'])} on disk")
    out.print(
        f"params {info['params']:,} · nonzero {info['nonzero_params']:,} · sparsity {info['sparsity'] * 100:.1f}%"
    )
    t = Table()
    for c in ("tensor", "shape", "dtype", "nonzero", "sparsity", "encoding"):
        t.add_column(c, justify="left" if c in ("tensor", "encoding", "dtype") else "right")
    for row in info["tensors"]:
        t.add_row(
            row["name"],
            "×".join(map(str, row["shape"])),
            row["dtype"],
            f"{row['nonzero']:,}",
            f"{row['sparsity'] * 100:.1f}%",
            row.get("encoding", ""),
        )
    out.print(t)


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""Everything the command line shows: run progress (a :class:`RunListener` drawing rich progress
bars and lines on stderr), the report table, stage and checkpoint tables, errors. The ONLY module
that prints to the terminal."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from compress_cli.events import RunListener

if TYPE_CHECKING:
    from compress_cli.errors import CompressError
    from compress_cli.report import Metrics, Report, StageEntry

err = Console(stderr=True, highlight=False)
out = Console(highlight=False)
if not out.is_terminal:
    out.width = max(out.width, 150)


class Renderer(RunListener):
    """Turns a run's events into rich progress bars and lines on ``console`` (nothing when quiet)."""

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

    def _print(self, text: str) -> None:
        if not self.quiet:
            self.c.print(text)

    def on_setup(self, recipe: str, device: str, output: Path) -> None:
        self._print(f"[bold]compress[/bold] {recipe} on {device} → {output}")
        if not self.quiet:
            self.progress.start()

    def on_message(self, text: str) -> None:
        self._print(f"  {text}")

    def on_baseline(self, metrics: Metrics) -> None:
        self._print(f"  baseline: {_summary(metrics)}")

    def on_stage_start(self, index: int, total: int, name: str, type_name: str) -> None:
        self._print(f"[cyan]stage {index}/{total}[/cyan] {name}")

    def on_stage_end(self, entry: StageEntry) -> None:
        self._print(f"  {entry.name} done in {entry.duration_s:.1f} s: {_summary(entry.metrics)}")
        for v in entry.guard_violations or []:
            self._print(f"  [yellow]guard violated:[/yellow] {v}")

    def on_epoch_start(self, label: str, epoch: int, epochs: int, steps: int) -> None:
        self._new(f"  {label} epoch {epoch}/{epochs}", steps)

    def on_step(self, label: str) -> None:
        if self.task is not None:
            self.progress.advance(self.task)

    def on_epoch_end(self, label: str, metrics: dict[str, float]) -> None:
        self._done()
        extra = f" val {metrics['val_accuracy'] * 100:.2f}%" if "val_accuracy" in metrics else ""
        self._print(f"  {label} epoch {metrics['epoch']:.0f}: loss {metrics['train_loss']:.4f}{extra}")

    def on_measure_start(self, samples: int) -> None:
        self._new("  measuring", samples)

    def on_eval_step(self, samples: int) -> None:
        if self.task is not None:
            self.progress.advance(self.task, samples)

    def on_measure_end(self, metrics: Metrics) -> None:
        self._done()

    def on_done(self, report: Report) -> None:
        self.progress.stop()

    def _new(self, desc: str, total: int) -> None:
        self._done()
        self.task = self.progress.add_task(desc, total=total)

    def _done(self) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
            self.task = None

    def stop(self) -> None:
        """Take the progress display down (after the run, or when it failed)."""
        self._done()
        self.progress.stop()


def _summary(m: Metrics) -> str:
    from compress_cli.report import human_bytes

    latency = f", {m.latency_ms:.3f} ms" if m.latency_ms else ""
    score = f"top-1 {(m.accuracy or 0) * 100:.2f}%" if m.primary is None else f"{m.primary} {m.score:.4f}"
    return f"{score}, {human_bytes(m.size_bytes)}{latency} ({m.runtime})"


def problems(e: CompressError, debug: bool) -> None:
    """An error's problems, one ``error:`` line each on stderr (with the traceback when ``debug``)."""
    if debug:
        import traceback

        traceback.print_exception(e)
    for p in e.problems:
        # the problem is plain text: its brackets (exclude: [module globs]) are not rich markup
        err.print(f"[red]error:[/red] {escape(p)}", markup=True, soft_wrap=True)


def interrupted() -> None:
    """The line for a run stopped by a second Ctrl-C."""
    err.print("[red]interrupted[/red]")


def report_table(report: Report) -> Table:
    """The report's rows (baseline, then each stage) as a rich table."""
    from compress_cli.report import headings, rows

    t = Table(title=f"{report.recipe} ({report.device})")
    for name in headings(report):
        t.add_column(name, justify="left" if name in ("stage", "runtime") else "right")
    for r in rows(report):
        t.add_row(*r)
    return t


def run_result(report: Report) -> None:
    """A finished run: the report table, any unstable speedup and why, where the model and report are."""
    out.print(report_table(report))
    for label, m in report.measured():
        if m.unstable:
            out.print(f"[yellow]unstable speedup[/yellow] ({label}): {escape(m.unstable)}")
    out.print(f"model: {report.output}/model · report: {report.output}/report.md")


def compare_table(rows: list[dict[str, Any]], files: list[Path]) -> None:
    """``compress compare``: the runs' final results, and where the table and plot were written."""
    from compress_cli.cli.compare import COLUMNS

    t = Table(title="compare: final result per run")
    for heading, _ in COLUMNS:
        t.add_column(
            heading, justify="left" if heading in ("run", "metric", "runtime", "Pareto") else "right"
        )
    for r in rows:
        t.add_row(*(escape(str(r[k])) for _, k in COLUMNS))
    out.print(t)
    out.print("wrote " + " · ".join(str(f) for f in files))


def merged_recipe(data: Any) -> None:
    """A recipe's data (``extends:`` merged) as YAML on stdout."""
    import yaml

    sys.stdout.write(yaml.safe_dump(data, sort_keys=False))


def tracked(url: str) -> None:
    """Where the run was logged (its MLflow run's URL)."""
    out.print(f"tracked: {escape(url)}")


def bench_result(result: dict[str, Any], written: bool) -> None:
    """``compress bench``: each batch size's paired numbers, any instability, the machine."""
    from compress_cli.report import ratio_text

    t = Table(title=f"{result['run']}: original vs final, paired ({result['runtime']})")
    for c in ("batch", "original ms p50/p90", "final ms p50/p90", "speedup [95%]", "rounds×calls", ""):
        t.add_column(c, justify="right" if c else "left")
    for p in result["paired"]:
        t.add_row(
            str(p["batch"]),
            f"{p['a_ms_p50']:.3f} / {p['a_ms_p90']:.3f}",
            f"{p['b_ms_p50']:.3f} / {p['b_ms_p90']:.3f}",
            ratio_text(p["ratio"], p["ci"], p.get("unstable")),
            f"{p['rounds']}×{p['calls']}",
            "unstable" if p.get("unstable") else "stable",
        )
    out.print(t)
    if result.get("unstable"):
        out.print(f"[yellow]unstable:[/yellow] {escape(result['unstable'])}")
    m = result["machine"]
    out.print(
        f"{m['cpu']} · {m['cores_usable']} cores · {m['threads']} threads · "
        f"OMP_WAIT_POLICY {m['omp_wait_policy']} · load {m['load_start']} → {m['load_end']}"
    )
    if written:
        out.print(f"updated {result['run']}/report.json, report.md and report.png")


def json_document(document: Any) -> None:
    """``document`` as one JSON line on stdout (nothing else goes there)."""
    sys.stdout.write(json.dumps(document, default=str) + "\n")


def schema(document: dict[str, Any]) -> None:
    """The recipe JSON Schema, indented, on stdout."""
    sys.stdout.write(json.dumps(document, indent=2) + "\n")


def validated(path: Path, name: str, stage_types: list[str], stderr: bool = False) -> None:
    """``ok`` for a valid recipe, with its stages (on stderr when stdout carries the recipe)."""
    text = f"[green]ok[/green] {path}: {name}, {len(stage_types)} stage(s): " + ", ".join(stage_types)
    (err if stderr else out).print(text)


def lines(items: list[str]) -> None:
    """Plain lines on stdout (a dry run's preview)."""
    for line in items:
        out.print(line)


def stage_list(rows: list[tuple[str, str]]) -> None:
    """The registered stages: (type, first line of its description)."""
    t = Table(title="stages")
    t.add_column("type")
    t.add_column("description")
    for row in rows:
        t.add_row(*row)
    out.print(t)


def stage_help(name: str, doc: str, parameters: list[tuple[str, str, str, str]]) -> None:
    """One stage: its description and (parameter, type, default, description) rows."""
    out.print(f"[bold]{name}[/bold]: {doc}")
    t = Table()
    for c in ("parameter", "type", "default", "description"):
        t.add_column(c)
    for row in parameters:
        t.add_row(*row)
    out.print(t)


def _direction(higher: bool) -> str:
    return "higher is better" if higher else "lower is better"


def task_list(infos: list[dict[str, Any]]) -> None:
    """``compress tasks``: one row per built-in task (``Task.info()``), then the custom task."""
    t = Table(title="tasks (recipe key task.type)")
    for c in ("task", "primary metric", "metrics", "labels", "original model", "description"):
        t.add_column(c)
    for i in infos:
        t.add_row(
            i["task"],
            f"{i['primary']} ({_direction(i['higher_is_better'])})",
            ", ".join(i["metrics"]),
            "needed" if i["needs_labels"] else "not needed",
            "scored against it" if i["needs_reference"] else "",
            i["summary"],
        )
    custom = "task.source: package.module:callable returning a task object"
    t.add_row("custom", "yours", "yours", "yours", "", custom)
    out.print(t)
    out.print("compress tasks NAME describes one; task.primary picks another metric for guards and hpo")


def task_help(info: dict[str, Any]) -> None:
    """``compress tasks NAME``: the task's description, metrics and ``task.kwargs``."""
    out.print(f"[bold]{info['task']}[/bold]: {info['doc']}")
    labels = "needs labels" if info["needs_labels"] else "works without labels"
    ref = "; scored against the original model's outputs" if info["needs_reference"] else ""
    out.print(f"{labels}{ref}")
    t = Table(title="metrics")
    for c in ("metric", "direction", "meaning"):
        t.add_column(c)
    for metric, (meaning, higher) in info["metrics"].items():
        primary = " (primary)" if metric == info["primary"] else ""
        t.add_row(metric + primary, _direction(higher), meaning)
    out.print(t)
    if info["options"]:
        k = Table(title="task.kwargs")
        for c in ("key", "default", "meaning"):
            k.add_column(c)
        for key, (default, meaning) in info["options"].items():
            k.add_row(key, "null" if default is None else repr(default).lower(), meaning)
        out.print(k)
    else:
        out.print("task.kwargs: none")


def custom_task_help(protocol: list[str]) -> None:
    """``compress tasks custom``: what ``task.source`` must return."""
    out.print(
        "[bold]custom[/bold]: task: {type: custom, source: package.module:callable, kwargs: {...}}. "
        "The callable gets (task config, number of classes or None) and returns an object with: "
        + ", ".join(protocol)
        + ". Subclass compress_cli.tasks.Task (or a built-in task) to get batch splitting and "
        "output selection; CONTRIBUTING.md, 'Add a task', has a worked example."
    )


def inspection(path: Path, info: dict[str, Any]) -> None:
    """``compress inspect``: size, parameter counts and one row per tensor."""
    from compress_cli.report import human_bytes

    out.print(f"[bold]{path}[/bold]: {info['kind']}, {human_bytes(info['size_bytes'])} on disk")
    out.print(
        f"params {info['params']:,} · nonzero {info['nonzero_params']:,} · "
        f"sparsity {info['sparsity'] * 100:.1f}%"
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

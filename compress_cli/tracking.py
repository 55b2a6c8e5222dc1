"""Experiment tracking: a :class:`RunListener` that logs a run to MLflow from the run's own events.

The engine knows nothing of MLflow: the CLI adds an :class:`MlflowTracker` next to its renderer
(:class:`compress_cli.events.Listeners`), and the tracker turns the events into MLflow calls. What
is logged: the resolved recipe as params (flattened dotted keys, a value longer than MLflow's limit
truncated with a note), the baseline's metrics at step 0 and every stage's at its index, the final
metrics (``final.*``), the guard outcome and the machine facts the report has (tags), the tool
version and the git commit of the working directory (tags), and report.json/md/png, recipe.yaml,
every model.onnx and the model directory as artifacts.

Tracking never costs the compression work: a server that is down or fails mid-run gives one
warning (through the run's ``on_message``) and the run goes on untracked. HTTP calls use short
timeouts and few retries unless ``MLFLOW_HTTP_REQUEST_TIMEOUT`` / ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``
say otherwise. The MLflow run id is kept in ``OUTPUT/tracking.json``, so ``--resume`` continues the
same MLflow run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from compress_cli.errors import RecipeError
from compress_cli.events import RunListener

if TYPE_CHECKING:
    from compress_cli.config.recipe import MlflowConfig, Recipe
    from compress_cli.report import Metrics, Report, StageEntry

#: the file in the output directory that holds the MLflow run id (what ``--resume`` continues)
TRACKING_FILE = "tracking.json"
#: MLflow's limit on a param value's length (``mlflow.utils.validation.MAX_PARAM_VAL_LENGTH``)
PARAM_LIMIT = 6000
#: settings of the tracking calls unless the environment sets them: short HTTP timeouts and few
#: retries (a dead server costs seconds, not minutes), and no URL printed by MLflow itself
ENV_DEFAULTS = {
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # library code never prints: the CLI shows the URL
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
INSTALL_HINT = "pip install 'compress-cli[mlflow]'"


def tracking_uri(uri: str) -> str:
    """The URI MLflow understands: ``mlflow://HOST:PORT`` is ``http://HOST:PORT``."""
    return "http://" + uri[len("mlflow://") :] if uri.startswith("mlflow://") else uri


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}, "s": [{"t": 2}]}`` -> ``{"a.b": "1", "s.0.t": "2"}``; None values are left
    out, lists of scalars stay one value (``[1, 64]``)."""
    out: dict[str, str] = {}
    if isinstance(value, dict):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}{i}."))
    elif value is not None:
        out[prefix[:-1]] = value if isinstance(value, str) else json.dumps(value)
    return out


def truncate(value: str, limit: int = PARAM_LIMIT) -> str:
    """``value`` cut to ``limit`` characters, saying so (the whole recipe is the recipe.yaml artifact)."""
    if len(value) <= limit:
        return value
    note = f" …[truncated from {len(value)} chars; see the recipe.yaml artifact]"
    return value[: limit - len(note)] + note


def recipe_params(recipe: Recipe) -> dict[str, str]:
    """The resolved recipe as MLflow params: flattened dotted keys, values within MLflow's limit."""
    d = recipe.to_yaml_dict()
    d["stages"] = [s.model_dump(mode="json", exclude_none=True) for s in recipe.stages]
    return {k: truncate(v) for k, v in flatten(d).items()}


def metric_values(m: Metrics) -> dict[str, float]:
    """The numbers of one measurement (bools and strings left out; ``scores.NAME`` for a task's)."""
    out: dict[str, float] = {}
    for k, v in m.to_dict().items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
        elif k == "scores" and isinstance(v, dict):
            out.update({f"scores.{n}": float(x) for n, x in v.items() if isinstance(x, (int, float))})
    return out


def git_commit(cwd: Path | None = None) -> str | None:
    """The commit checked out in ``cwd`` (default: the working directory), or None outside git."""
    try:
        r = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd or Path.cwd(),
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 and r.stdout.strip() else None


def check_installed(where: str) -> None:
    """Refuse (located :class:`RecipeError`) tracking when the ``mlflow`` package is missing."""
    if importlib.util.find_spec("mlflow") is None:
        raise RecipeError(f"{where}: tracking.mlflow: MLflow is not installed ({INSTALL_HINT})")


@contextlib.contextmanager
def _env(uri: str) -> Iterator[None]:
    """The HTTP defaults (and, for a ``file:`` store the recipe names, MLflow 3's opt-in to it) set
    for the duration of a call, the environment's own values kept."""
    extra = dict(ENV_DEFAULTS)
    if uri.startswith("file:"):
        extra["MLFLOW_ALLOW_FILE_STORE"] = "true"
    added = [k for k in extra if k not in os.environ]
    for k in added:
        os.environ[k] = extra[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


def tracker_for(
    recipe: Recipe, where: str, *, resume: bool = False, notify: Callable[[str], None] | None = None
) -> MlflowTracker | None:
    """The tracker of ``recipe.tracking`` (``where`` locates it for the not-installed error), or
    None when the recipe tracks nothing."""
    cfg = recipe.tracking.mlflow if recipe.tracking is not None else None
    if cfg is None:
        return None
    return MlflowTracker(cfg, recipe, resume=resume, notify=notify, where=where)


@contextlib.contextmanager
def finishing(tracker: MlflowTracker | None) -> Iterator[None]:
    """Run the block, then end the tracker's MLflow run as the block ended (FINISHED, FAILED, KILLED)."""
    if tracker is None:
        yield
        return
    try:
        yield
    except BaseException as e:
        tracker.finish(e)
        raise
    tracker.finish()


class MlflowTracker(RunListener):
    """Logs one run to MLflow as its events arrive; on any failure, one warning and no more tracking.

    ``notify`` receives the warnings (the CLI passes its renderer's ``on_message``). After the run,
    :meth:`finish` ends the MLflow run; :attr:`run_url` says where to look.
    """

    def __init__(
        self,
        cfg: MlflowConfig,
        recipe: Recipe,
        *,
        resume: bool = False,
        notify: Callable[[str], None] | None = None,
        where: str = "tracking.mlflow",
    ) -> None:
        check_installed(where)
        self.cfg = cfg
        self.recipe = recipe
        self.uri = tracking_uri(cfg.uri)
        self.resume = resume
        self.notify = notify or (lambda _text: None)
        self.out = recipe.output_dir()
        self.client: Any = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.run_url: str | None = None
        self.failed: str | None = None  # the warning given when tracking stopped

    # -- plumbing ----------------------------------------------------------------------------
    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` with the short HTTP settings; an exception turns tracking off with one warning."""
        if self.failed is not None:
            return None
        try:
            with _env(self.uri):
                return fn()
        except Exception as e:  # any failure of the tracking side: the run itself must go on
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            self.failed = (
                f"warning: MLflow tracking at {self.uri} stopped ({what}: {first[:300]}); "
                "the run goes on untracked"
            )
            self.client = None
            self.notify(self.failed)
            return None

    @property
    def active(self) -> bool:
        """Whether an MLflow run is open and logging works so far."""
        return self.failed is None and self.client is not None and self.run_id is not None

    def _saved_run_id(self) -> str | None:
        try:
            return str(json.loads((self.out / TRACKING_FILE).read_text())["run_id"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _start(self) -> None:
        from mlflow.tracking import MlflowClient

        from compress_cli._version import __version__

        self.client = MlflowClient(tracking_uri=self.uri)
        run_id = self._saved_run_id() if self.resume else None
        if run_id is not None:
            run = self.client.get_run(run_id)
            self.experiment_id = run.info.experiment_id
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run_id
            return
        exp = self.client.get_experiment_by_name(self.cfg.experiment)
        self.experiment_id = (
            exp.experiment_id if exp is not None else self.client.create_experiment(self.cfg.experiment)
        )
        tags = {"compress.version": __version__, "compress.recipe": self.recipe.name}
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        run = self.client.create_run(
            self.experiment_id, run_name=self.cfg.run_name or self.recipe.name, tags=tags
        )
        self.run_id = run.info.run_id
        self._params(recipe_params(self.recipe))

    def _params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def _metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def _url(self) -> str:
        if self.uri.startswith(("http://", "https://")):
            return f"{self.uri.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"{self.uri} (experiment {self.experiment_id}, run {self.run_id})"

    # -- the run's events --------------------------------------------------------------------
    def on_setup(self, recipe: str, device: str, output: Path) -> None:
        """Open the MLflow run (or reopen the one ``OUTPUT/tracking.json`` names, on ``--resume``)."""
        self._call("starting the run", self._start)
        if self.active:
            self.run_url = self._url()
            self.notify(f"tracking: MLflow run {self.run_url}")

    def on_baseline(self, metrics: Metrics) -> None:
        """Keep the run id in the output directory (now prepared) and log the baseline at step 0."""
        if not self.active:
            return
        from compress_cli._utils.io import atomic_write_text

        with contextlib.suppress(OSError):
            atomic_write_text(
                self.out / TRACKING_FILE,
                json.dumps({"uri": self.uri, "experiment_id": self.experiment_id, "run_id": self.run_id}),
            )
        if not self.resume:
            self._call("logging the baseline", lambda: self._metrics(metric_values(metrics), 0))

    def on_stage_end(self, entry: StageEntry) -> None:
        """Log the stage's metrics (and its duration) with its index as the step."""
        if self.active:
            values = {**metric_values(entry.metrics), "duration_s": entry.duration_s}
            self._call(f"logging stage {entry.index}", lambda: self._metrics(values, entry.index))

    def on_done(self, report: Report) -> None:
        """Final metrics, the guard outcome and machine facts as tags, the report and model files."""
        if not self.active:
            return
        final = report.final
        if final is not None:
            values = {f"final.{k}": v for k, v in metric_values(final).items()}
            if report.duration_s is not None:
                values["duration_s_total"] = report.duration_s
            step = report.stages[-1].index if report.stages else 0
            self._call("logging the final metrics", lambda: self._metrics(values, step))
        self._call("setting the tags", lambda: self._tags(report))
        self._call("uploading the artifacts", lambda: self._artifacts(report))

    def _tags(self, report: Report) -> None:
        violations = (report.guard or {}).get("violations") or []
        tags = {
            "guard": "violated" if violations else "passed",
            "guard.violations": "; ".join(violations)[:5000],
            "device": report.device,
        }
        if report.reverted_to is not None:
            tags["guard.reverted_to_stage"] = str(report.reverted_to)
        if report.stopped_early:
            tags["stopped_early"] = report.stopped_early
        if report.final is not None:  # the machine facts the report has: runtime, threads, provider...
            for k in ("runtime", "device", "threads", "provider", "onnxruntime", "compile"):
                v = getattr(report.final, k)
                if v is not None:
                    tags[f"final.{k}"] = str(v)
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def _artifacts(self, report: Report) -> None:
        for name in ("report.json", "report.md", "report.png", "recipe.yaml"):
            if (self.out / name).is_file():
                self.client.log_artifact(self.run_id, str(self.out / name))
        onnx = {self.out / "model.onnx"} | {
            Path(a) for s in report.stages for a in s.artifacts if str(a).endswith(".onnx")
        }
        for p in sorted(onnx):
            if p.is_file():
                self.client.log_artifact(self.run_id, str(p))
        if (self.out / "model").is_dir():
            self.client.log_artifacts(self.run_id, str(self.out / "model"), "model")

    def finish(self, error: BaseException | None = None) -> None:
        """End the MLflow run: FINISHED, FAILED (an error; a guard failure too) or KILLED (a signal)."""
        if not self.active:
            return
        from compress_cli.errors import Interrupted

        if error is None:
            status = "FINISHED"
        elif isinstance(error, (Interrupted, KeyboardInterrupt)):
            status = "KILLED"
        else:
            status = "FAILED"
            msg = str(error).strip()[:5000]
            if msg:
                self._call("tagging the error", lambda: self.client.set_tag(self.run_id, "error", msg))
        self._call("ending the run", lambda: self.client.set_terminated(self.run_id, status))

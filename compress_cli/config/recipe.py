"""The recipe models: ``Recipe`` and its sections (model, data, measure, guard).

Every model forbids unknown keys and is frozen; source strings are checked by what the sources
package registered (:mod:`compress_cli.config.source_checks`). ``compress_cli.config.validation``
adds the stage configs, one located line per problem and the cross-stage rules. The section models'
docstrings stay out of the schema ``compress schema`` prints (pydantic would copy them in as
descriptions): their fields carry the descriptions.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from compress_cli.config.bounds import (
    MAX_BATCH,
    MAX_COUNT,
    MAX_SECONDS,
    BatchSize,
    Dim,
    Position,
)
from compress_cli.config.source_checks import check_source
from compress_cli.config.stage import StageConfig

#: the value of a stage field that an earlier finder stage fills in (``lr: auto``)
AUTO = "auto"


def _no_description(schema: dict[str, Any]) -> None:
    """Drop the description pydantic makes of a section model's docstring from its JSON Schema."""
    schema.pop("description", None)


class _Strict(BaseModel):
    """Unknown keys are errors (a typo fails validation before any model loads); values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_extra=_no_description)


class ModelConfig(_Strict):
    """``model:``: where the model comes from and how to build it."""

    source: str = Field(
        description="zoo:NAME | torchvision:NAME | timm:NAME | hf:PATH_OR_NAME | package.module:callable "
        "| path to a compressed model dir"
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="constructor keyword arguments (timm: pretrained; hf: hf_class, local_files_only, "
        "attn_implementation, config fields such as num_labels)",
    )
    checkpoint: str | None = Field(
        None, description=".pt/.pth state_dict, .safetensors, or a compressed model dir"
    )
    input_shape: list[Dim] | None = Field(
        None, description="one sample's shape, e.g. [1, 28, 28] (default: the data's)"
    )
    allow_pickle: bool = Field(
        False, description="allow a fully pickled module checkpoint (runs code: trust it)"
    )
    trust_source: bool = Field(
        False,
        exclude=True,  # a decision of whoever runs: not copied into recipe.yaml, manifests, digests
        description="let a compressed model directory (source, checkpoint, snapshots) name a "
        "package.module:callable source, i.e. run code it names (trust it)",
    )

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return check_source("model", v)

    @field_validator("input_shape", mode="before")
    @classmethod
    def _positive(cls, v: Any) -> Any:
        # before the items' own bounds, so a 0 or negative size reads as what the list must hold
        if isinstance(v, list) and (not v or any(type(d) is int and d <= 0 for d in v)):
            raise ValueError("must be a non-empty list of positive sizes")
        return v


class DataConfig(_Strict):
    """``data:``: the dataset source, its splits and the loader settings."""

    source: str = Field(
        "digits",
        description="digits | mnist | fashion_mnist | torchvision:NAME | imagefolder | synthetic "
        "| text | hf_datasets | package.module:callable",
    )
    root: str | None = Field(None, description="folder holding the dataset files")
    download: bool = Field(False, description="let torchvision datasets download (needs internet)")
    batch_size: int = Field(64, gt=0, le=MAX_BATCH, description="training batch size")
    eval_batch_size: int = Field(256, gt=0, le=MAX_BATCH, description="batch size for evaluation")
    val_fraction: float = Field(
        0.1, ge=0, lt=1, description="share of the training data held out for validation"
    )
    test_fraction: float = Field(
        0.25, gt=0, lt=1, description="held-out test share for sources without a test split"
    )
    calibration_batches: int = Field(
        8, gt=0, le=100_000, description="training batches kept for calibration/importance"
    )
    limit_train: int | None = Field(
        None, gt=0, le=MAX_COUNT, description="use at most this many training samples"
    )
    limit_test: int | None = Field(None, gt=0, le=MAX_COUNT, description="use at most this many test samples")
    input_shape: list[Dim] | None = Field(None, description="synthetic: one sample's shape")
    num_classes: int | None = Field(None, gt=1, le=1_000_000, description="synthetic: number of classes")
    num_workers: int = Field(0, ge=0, le=1024, description="DataLoader worker processes")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra arguments for the source")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return check_source("data", v)


#: the built-in task types (``compress tasks`` documents them; ``source:`` makes a custom one)
TASK_TYPES = ("classification", "fidelity", "regression", "multilabel", "segmentation", "embedding")


class TaskConfig(_Strict):
    """``task:``: how a batch splits into model inputs and targets, which output is scored, and how
    (loss, metrics, primary metric). ``task: fidelity`` is short for ``task: {type: fidelity}``."""

    type: str = Field(
        "classification",
        description="classification | fidelity | regression | multilabel | segmentation | embedding "
        "| custom (with source)",
    )
    source: str | None = Field(
        None, description="custom: package.module:callable returning a task object (runs code: trust it)"
    )
    inputs: list[str | Position] | None = Field(
        None,
        max_length=64,
        description="what goes to forward: dict-batch keys (as keywords) or tuple-batch positions "
        "(positional); default: every key but the target / everything but the last element",
    )
    target: str | Position | None = Field(
        None,
        description="the target's dict key or tuple position (default: labels / label for dicts, "
        "the last element of a tuple); null for unlabelled data",
    )
    output: str | Position | None = Field(
        None,
        description="the output the metrics see: a key or attribute (logits, last_hidden_state, "
        "pooler_output), a tuple index, or a pooling: mean_pool (by the attention mask), cls "
        "(default: the tensor itself, else logits, else last_hidden_state, else the first element)",
    )
    normalize: bool = Field(False, description="L2-normalise the selected output (embeddings)")
    primary: str | None = Field(None, description="the metric guards and hpo use (default: the task's)")
    kwargs: dict[str, Any] = Field(
        default_factory=dict, description="task settings (e.g. threshold, ignore_index, score_key)"
    )

    @field_validator("type")
    @classmethod
    def _type(cls, v: str) -> str:
        if v not in (*TASK_TYPES, "custom"):
            from compress_cli.errors import did_you_mean

            raise ValueError(f"unknown task {v!r}{did_you_mean(v, (*TASK_TYPES, 'custom'))}")
        return v

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs(cls, v: Any) -> Any:
        return [v] if isinstance(v, (str, int)) else v

    @model_validator(mode="after")
    def _custom(self) -> TaskConfig:
        if (self.type == "custom") != (self.source is not None):
            raise ValueError("task.source (package.module:callable) goes with type: custom, and only with it")
        return self


class LatencyConfig(_Strict):
    """``measure.latency:``: batch sizes, warm-up and iterations of the latency measurement."""

    batch_sizes: list[BatchSize] = Field(
        [1, 64], min_length=1, description="first: latency batch; last: throughput batch"
    )
    warmup: int = Field(5, ge=0, le=1_000_000)
    iterations: int = Field(20, gt=0, le=1_000_000)
    threads: int | None = Field(
        None, gt=0, le=4096, description="CPU threads (default: torch's current setting)"
    )
    rounds: int = Field(
        10,
        ge=2,
        le=100_000,
        description="speedups: rounds of the paired measurement (original and current model timed "
        "alternately), iterations // rounds calls of each per round",
    )
    remeasure_s: float = Field(
        3.0,
        ge=0,
        le=MAX_SECONDS,
        description="speedups: seconds a paired measurement that looks unstable may be repeated "
        "(with longer rounds) before it is reported as unstable; one budget for all batch sizes",
    )


class MeasureConfig(_Strict):
    """``measure:``: what the pipeline measures after every stage, and on which split."""

    latency: LatencyConfig | None = Field(default_factory=LatencyConfig, description="null disables latency")
    macs: bool = True
    split: Literal["test", "val"] = "test"


class GuardConfig(_Strict):
    """``guard:``: limits checked after every stage, and what a violation does."""

    max_accuracy_drop: float | None = Field(
        None, ge=0, le=100, description="points of top-1 against the baseline"
    )
    max_metric_drop: float | None = Field(
        None,
        ge=0,
        le=1e12,
        description="how much worse the task's primary metric may get than the baseline's, in its "
        "own units, direction-aware (classification: fraction of top-1, e.g. 0.01 = 1 point)",
    )
    max_latency_ms: float | None = Field(None, gt=0, le=MAX_SECONDS * 1000)
    max_size_bytes: int | None = Field(None, gt=0, le=1 << 50)
    min_speedup: float | None = Field(None, gt=0, le=1e6, description="baseline latency / current latency")
    on_violation: Literal["fail", "revert", "warn"] = "fail"


#: URI schemes ``tracking.mlflow.uri`` accepts (``mlflow://HOST:PORT`` is short for ``http://HOST:PORT``)
TRACKING_SCHEMES = ("http", "https", "mlflow", "file", "sqlite", "postgresql", "mysql", "databricks")


class MlflowConfig(_Strict):
    """``tracking.mlflow:``: the MLflow tracking server (or store) a run is logged to."""

    uri: str = Field(
        description="tracking URI: mlflow://HOST:PORT (= http://), http(s)://HOST:PORT, file:DIR, "
        "sqlite:///FILE, postgresql://..., databricks"
    )
    experiment: str = Field("compress", min_length=1, description="experiment name (created if missing)")
    run_name: str | None = Field(None, description="the MLflow run's name (default: the recipe's name)")

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        scheme = v.split(":", 1)[0].lower() if ":" in v else ""
        if scheme not in TRACKING_SCHEMES:
            raise ValueError(
                f"must be a tracking URI starting with one of {', '.join(s + ':' for s in TRACKING_SCHEMES)} "
                f"(got {v!r}; a server is mlflow://HOST:PORT)"
            )
        if scheme == "mlflow" and not v[len("mlflow://") :].strip("/"):
            raise ValueError(f"mlflow://HOST:PORT needs a host (got {v!r})")
        return v


class TrackingConfig(_Strict):
    """``tracking:``: where a run's parameters, metrics and artifacts are logged besides the run dir."""

    mlflow: MlflowConfig | None = Field(
        None, description="log to MLflow (pip install 'compress-cli[mlflow]')"
    )


class Recipe(_Strict):
    """A whole recipe (version 1); ``stages`` holds each stage's own validated config."""

    version: Literal[1] = 1
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seeds torch, numpy and random")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    deterministic: bool = Field(False, description="use deterministic algorithms (slower)")
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    measure: MeasureConfig = Field(default_factory=MeasureConfig)
    guard: GuardConfig = Field(default_factory=GuardConfig)
    time_budget_s: float | None = Field(
        None, gt=0, le=MAX_SECONDS, description="stop cleanly after this many seconds"
    )
    stages: list[StageConfig] = Field(default_factory=list)
    output: str | None = Field(None, description="output directory (default runs/NAME)")
    tracking: TrackingConfig | None = Field(
        None, description="experiment tracking (MLflow): params, metrics per stage, report and model"
    )

    @field_validator("task", mode="before")
    @classmethod
    def _task_shorthand(cls, v: Any) -> Any:
        if isinstance(v, str):  # task: fidelity
            return {"type": v}
        if isinstance(v, dict) and "source" in v and "type" not in v:
            return {**v, "type": "custom"}
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        ok = v in ("auto", "cpu", "cuda", "mps") or (v.startswith("cuda:") and v[5:].isdigit())
        if not ok:
            raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps (got {v!r})")
        return v

    @model_validator(mode="after")
    def _guard_fits_task(self) -> Recipe:
        if self.guard.max_accuracy_drop is not None and self.task.type not in ("classification", "custom"):
            raise ValueError(
                f"guard.max_accuracy_drop: task {self.task.type} reports no top-1 accuracy; "
                "use guard.max_metric_drop (the task's primary metric, in its own units)"
            )
        return self

    def output_dir(self) -> Path:
        """The output directory: ``output``, or ``runs/NAME``."""
        return Path(self.output or f"runs/{self.name}")

    def to_yaml_dict(self) -> dict[str, Any]:
        """Every top-level field as JSON-compatible values (``None`` kept)."""
        return self.model_dump(mode="json", exclude_none=False)

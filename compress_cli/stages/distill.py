"""The ``distill`` stage: knowledge distillation from a teacher (default: the model as loaded)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from compress_cli.config.recipe import ModelConfig
from compress_cli.errors import StageError
from compress_cli.stages.base import Stage, StageConfig, StageResult
from compress_cli.stages.registry import register_stage
from compress_cli.state import State
from compress_cli.training import TrainOptions

if TYPE_CHECKING:
    import torch


class FeaturePair(BaseModel):
    """One intermediate-feature pair: MSE between the two layers' outputs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    student: str = Field(
        min_length=1, description="student layer name (as in model.named_modules(), e.g. conv2)"
    )
    teacher: str = Field(
        min_length=1, description="teacher layer name whose output the student layer should match"
    )
    weight: float = Field(1.0, gt=0, le=1e4, description="weight of this pair's MSE in the loss")


def _spec_shorthand(keyword: str):  # type: ignore[no-untyped-def]
    def parse(v: Any) -> Any:
        if isinstance(v, str) and v != keyword:
            return {"source": v}  # `zoo:fashion_cnn_small` or a compressed model directory
        return v

    return parse


class DistillConfig(StageConfig, TrainOptions):
    """Train the student on the teacher's softened outputs (plus the labels), with finetune's options."""

    teacher: Literal["original"] | ModelConfig = Field(
        "original",
        description="'original' (the model as loaded, before any stage), a compressed model directory, "
        "or a model spec {source, kwargs, checkpoint}",
    )
    student: Literal["current"] | ModelConfig = Field(
        "current",
        description="'current' (the model as the previous stages left it), or a model spec "
        "{source, kwargs, checkpoint} / source string (e.g. zoo:fashion_cnn_small) that replaces it",
    )
    temperature: float = Field(4.0, gt=0, le=100, description="softmax temperature T of the KD term")
    alpha: float = Field(
        0.9,
        ge=0,
        le=1,
        description="weight of the KD term (times T^2); 1 - alpha weighs the cross-entropy "
        "(1: labels unused)",
    )
    features: list[FeaturePair] = Field(
        default_factory=list,
        description="intermediate layers to match (MSE), with a learned 1x1 conv/Linear projection "
        "when widths differ",
    )
    cache_teacher: bool = Field(
        False,
        description="compute the teacher's outputs once over the training set (fixed data, no augmentation)",
    )
    kd_loss: Literal["auto", "kl", "mse", "cosine"] = Field(
        "auto",
        description="soft term on the task-selected outputs: kl (softened logits, temperature T), mse or "
        "cosine (embeddings, hidden states); auto: kl for classification, the loss of task: fidelity "
        "(task.kwargs.loss), kl for other tasks' (batch, classes) logits, else mse",
    )

    _teacher_str = field_validator("teacher", mode="before")(_spec_shorthand("original"))
    _student_str = field_validator("student", mode="before")(_spec_shorthand("current"))


def _describe(spec: ModelConfig) -> str:
    s = spec.source + (f" {spec.kwargs}" if spec.kwargs else "")
    return s + (f" from {spec.checkpoint}" if spec.checkpoint else "")


@register_stage("distill")
class Distill(Stage[DistillConfig]):
    """Knowledge distillation: train the student on the teacher's temperature-softened logits.

    Loss ``alpha * T^2 * KL(softmax(z_t/T) || softmax(z_s/T)) + (1 - alpha) * CE`` plus optional
    weighted MSE between named intermediate layers (a learned 1x1 conv / Linear projection maps the
    student's width to the teacher's; it is trained but not saved). The teacher (the original model
    by default) runs in eval mode without gradients. The student is the current model, or a new
    architecture that replaces it (recorded in the manifest, so ``load()`` rebuilds the student).
    Every ``finetune`` option applies: training goes through the shared loop. ``alpha: 1`` trains
    on unlabelled data; ``cache_teacher`` computes the teacher's logits once for a fixed dataset.
    """

    example = {"epochs": 1, "lr": 0.01, "max_steps_per_epoch": 5, "temperature": 4.0, "alpha": 0.9}

    @classmethod
    def trains(cls, config: StageConfig) -> bool:
        return True

    @classmethod
    def check(cls, config: StageConfig, device: str, earlier: Sequence[StageConfig] = ()) -> list[str]:
        problems: list[str] = []
        if not isinstance(config, DistillConfig):
            return problems
        if config.cache_teacher and config.features:
            problems.append(
                "cache_teacher cannot be combined with features (feature matching runs the teacher "
                "on every batch anyway); drop one of them"
            )
        for role, spec in (("teacher", config.teacher), ("student", config.student)):
            if isinstance(spec, ModelConfig) and spec.input_shape is not None:
                problems.append(f"{role}.input_shape: the data decides the input shape; remove it")
        t = config.teacher
        if isinstance(t, ModelConfig) and ":" in t.source and not t.checkpoint and "weights" not in t.kwargs:
            problems.append(
                f"teacher {t.source!r} has no checkpoint: a randomly initialised teacher teaches "
                "nothing (give teacher.checkpoint, or a compressed model directory)"
            )
        return problems

    @classmethod
    def replaces_model(cls, config: StageConfig) -> bool:
        return isinstance(config, DistillConfig) and isinstance(config.student, ModelConfig)

    def preflight(self, state: State) -> None:
        """Refused now: a hard-label term on unlabelled data, and a teacher or new student that does
        not fit the data or whose selected output differs in shape from the other's (each model
        config is loaded once, on the CPU, and dropped)."""
        import torch

        from compress_cli._utils.batches import to_device
        from compress_cli.sources.models import load_model

        c = self.config
        _check_labels(c, state)
        if c.alpha == 0 and not c.features:
            return
        task = state.data.get_task()
        shapes = {}
        for field, spec in (("teacher", c.teacher), ("student", c.student)):
            if isinstance(spec, ModelConfig):
                model, _ = load_model(spec)
                state.data.check_model(model, self._hint(state, spec, field))
                x = state.data.example_input(2)
            else:
                model, x = state.model, to_device(state.data.example_input(2), state.device)
            with torch.no_grad():
                was = model.training
                shapes[field] = tuple(task.forward(model.eval(), x).shape[1:])
                model.train(was)
            del model
        if shapes["teacher"] != shapes["student"]:
            what = _what(task)
            raise StageError(
                f"teacher outputs {list(shapes['teacher'])} {what}, the student {list(shapes['student'])}: "
                "they must agree"
            )

    def preview(self, state: State) -> list[str]:
        c = self.config
        t = _describe(c.teacher) if isinstance(c.teacher, ModelConfig) else "the model as loaded"
        s = "NEW " + _describe(c.student) if isinstance(c.student, ModelConfig) else "the current model"
        lines = [
            f"teacher: {t}; student: {s}; T={c.temperature}, alpha={c.alpha}"
            + (", teacher logits cached" if c.cache_teacher else "")
        ]
        if c.features:
            lines.append(
                "features: " + ", ".join(f"{f.student} <- {f.teacher} (x{f.weight:g})" for f in c.features)
            )
        return lines

    # ------------------------------------------------------------------ run
    def _hint(self, state: State, spec: ModelConfig, field: str) -> Callable[[int, int], str]:
        """The class-count hint for this stage's ``field`` model, naming its recipe keys."""
        from compress_cli.sources.hints import num_classes_hint

        where = f"stages[{self.index - 1}].{field}"
        return lambda m, n: num_classes_hint(spec, state.recipe.data, m, n, where)

    def _teacher(self, state: State) -> tuple[Any, str]:
        from compress_cli.distillation import freeze_teacher

        t = self.config.teacher
        if t == "original":
            return freeze_teacher(state.original_model(), state.device), "original"
        assert isinstance(t, ModelConfig)
        from compress_cli.sources.models import load_model

        model, _ = load_model(t)
        state.data.check_model(model, self._hint(state, t, "teacher"))
        return freeze_teacher(model, state.device), _describe(t)

    def _replace_student(self, state: State, spec: ModelConfig) -> dict[str, Any]:
        from compress_cli.sources.models import load_model

        model, base = load_model(spec)
        state.data.check_model(model, self._hint(state, spec, "student"))
        before = sum(p.numel() for p in state.model.parameters())
        after = sum(p.numel() for p in model.parameters())
        state.model = model.to(state.device)
        # what the checkpoint manifest rebuilds the architecture from from now on
        state.model_spec = ModelConfig.model_validate(
            {"source": base["source"], "kwargs": base.get("kwargs") or {}}
        )
        state.runner = None  # a runner wraps the old model
        state.transforms = []  # load-time transforms described the old model
        info = {
            "source": spec.source,
            "kwargs": dict(spec.kwargs),
            "checkpoint": spec.checkpoint,
            "params_before": before,
            "params_after": after,
        }
        state.edits.record(self.name, op="replace_model", **info)
        return info

    def run(self, state: State) -> StageResult:
        import torch

        from compress_cli._utils.batches import to_device
        from compress_cli.distillation import (
            FeatureMatcher,
            IndexedDataset,
            kd_loss,
            teacher_logit_cache,
            train_loader,
        )
        from compress_cli.tasks.classification import Classification
        from compress_cli.training import train

        c = self.config
        task = state.data.get_task()
        classify = isinstance(task, Classification)
        details: dict[str, Any] = {"temperature": c.temperature, "alpha": c.alpha}
        if isinstance(c.student, ModelConfig):
            details["student"] = self._replace_student(state, c.student)
        else:
            details["student"] = "current"
        student = state.model
        need_teacher = c.alpha > 0 or bool(c.features)
        teacher = None
        x0 = to_device(state.data.example_input(2), state.device)
        with torch.no_grad():
            was = student.training
            student.eval()
            ss = tuple(task.forward(student, x0).shape)
            student.train(was)
        if need_teacher:
            teacher, details["teacher"] = self._teacher(state)
            with torch.no_grad():
                ts = tuple(task.forward(teacher, x0).shape)
            if ts != ss:
                raise StageError(
                    f"teacher outputs {list(ts[1:])} {_what(task)}, the student {list(ss[1:])}: "
                    "they must agree"
                )
        _check_labels(c, state)
        kind = _soft_kind(c, task, ss)
        if c.alpha > 0:
            details["kd_loss"] = kind
        dataset = state.data.train_dataset
        bs = state.resolve(c.batch_size, "batch_size") if c.batch_size is not None else None
        T, alpha, smooth = c.temperature, c.alpha, c.label_smoothing

        def hard(x: Any, y: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
            """The task's own loss as the hard term (None: cross-entropy on the labels)."""
            if classify:
                return None

            def loss(pred: torch.Tensor) -> torch.Tensor:
                ref = task.reference_output(x) if task.needs_reference else None
                return task.loss(pred, y, ref)

            return loss

        matcher = None
        if c.features:
            assert teacher is not None
            pairs = [(f.student, f.teacher, f.weight) for f in c.features]
            matcher = FeatureMatcher(student, teacher, pairs, x0, state.device)
            details["features"] = matcher.shapes

        loader = None
        split = None
        loss_fn: Callable[[torch.Tensor, Any, Any], torch.Tensor]
        if c.cache_teacher and c.alpha > 0:
            assert teacher is not None
            n = len(dataset)  # type: ignore[arg-type]
            state.ctx.listener.on_message(f"{self.name}: caching the teacher's outputs over {n} samples")
            cached_out, cached_targets = teacher_logit_cache(
                teacher, dataset, state.device, state.data.eval_batch_size, state.data.num_workers, task
            )
            details["teacher_cache"] = {"samples": int(cached_out.shape[0])}
            loader = train_loader(state, IndexedDataset(dataset), bs)

            def split(batch: Any) -> tuple[Any, Any]:  # (the samples, their indices)
                return task.inputs(batch[0]), batch[1]

            def cached_loss(out: torch.Tensor, x: Any, idx: torch.Tensor) -> torch.Tensor:
                y = cached_targets[idx] if cached_targets is not None and alpha < 1 else None
                return kd_loss(out, cached_out[idx], y, T, alpha, smooth, kind=kind, hard_loss=hard(x, y))

            loss_fn = cached_loss
        else:

            def live_loss(out: torch.Tensor, x: Any, y: Any) -> torch.Tensor:
                t_out = None
                if teacher is not None:
                    with torch.no_grad():
                        t_out = task.forward(teacher, x)
                loss = kd_loss(
                    out,
                    t_out if alpha > 0 else None,
                    y if alpha < 1 else None,
                    T,
                    alpha,
                    smooth,
                    kind=kind,
                    hard_loss=hard(x, y),
                )
                if matcher is not None:
                    loss = loss + matcher.loss()
                return loss

            loss_fn = live_loss

        try:
            res = train(
                student,
                state,
                c,
                loss_fn=loss_fn,
                loader=loader,
                split=split,
                extra_params=matcher.parameters() if matcher is not None else None,
                label=self.name,
            )
        finally:
            if matcher is not None:
                matcher.close()
        notes = res.notes(f"T={T:g}", f"alpha={alpha:g}")
        if isinstance(c.student, ModelConfig):
            notes = f"student {c.student.source}: " + notes
        details.update(res.summary())
        return StageResult(notes=notes, details=details)


def _check_labels(c: DistillConfig, state: State) -> None:
    """StageError when the hard term (``alpha < 1``) needs labels the training data lacks."""
    task = state.data.get_task()
    if c.alpha < 1 and task.needs_labels and not _labelled(state):
        raise StageError(
            f"the training data has no labels for the {task.name} task's term (1 - alpha): use alpha: 1 "
            "(pure distillation), labelled data, or task: fidelity"
        )


def _labelled(state: State) -> bool:
    """Whether the training batches carry a target (the first calibration batch says)."""
    if not state.data.labelled:
        return False
    calib = state.data.calibration()
    return bool(calib) and calib[0][1] is not None


def _soft_kind(c: DistillConfig, task: Any, shape: tuple[int, ...]) -> str:
    """The soft term ``kd_loss: auto`` resolves to for ``task`` and the selected output's shape."""
    from compress_cli.tasks.classification import Classification

    if c.kd_loss != "auto":
        return c.kd_loss
    if isinstance(task, Classification):
        return "kl"
    kind = getattr(task, "loss_kind", None)  # fidelity: task.kwargs.loss
    if kind in ("kl", "mse", "cosine"):
        return str(kind)
    return (
        "kl" if len(shape) == 2 and shape[1] > 1 and getattr(task.cfg, "output", None) == "logits" else "mse"
    )


def _what(task: Any) -> str:
    """What the compared outputs are called in messages: logits for classification."""
    from compress_cli.tasks.classification import Classification

    return "logits" if isinstance(task, Classification) else "(task-selected output)"

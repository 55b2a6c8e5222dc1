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
        description="compute the teacher's logits once over the training set (fixed data, no augmentation)",
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
        """Refused now: cross-entropy on unlabelled data, and a teacher or new student that does not
        fit the data or disagrees with the other's output size (each model config is loaded once,
        on the CPU, and dropped)."""
        import torch

        from compress_cli.distillation import has_labels
        from compress_cli.sources.models import load_model

        c = self.config
        if c.alpha < 1 and not (state.data.labelled and has_labels(state.data.train_dataset)):
            raise StageError(
                "the training data has no labels: use alpha: 1 (pure distillation) or labelled data"
            )
        if c.alpha == 0 and not c.features:
            return
        shapes = {}
        for field, spec in (("teacher", c.teacher), ("student", c.student)):
            if isinstance(spec, ModelConfig):
                model, _ = load_model(spec)
                state.data.check_model(model, self._hint(state, spec, field))
                x = state.data.example_input(2)
            else:
                model, x = state.model, state.data.example_input(2).to(state.device)
            with torch.no_grad():
                was = model.training
                shapes[field] = tuple(model.eval()(x).shape[1:])
                model.train(was)
            del model
        if shapes["teacher"] != shapes["student"]:
            raise StageError(
                f"teacher outputs {list(shapes['teacher'])} logits, the student {list(shapes['student'])}: "
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

        from compress_cli.distillation import (
            FeatureMatcher,
            IndexedDataset,
            LabelledView,
            has_labels,
            kd_loss,
            teacher_logit_cache,
            train_loader,
        )
        from compress_cli.training import train

        c = self.config
        details: dict[str, Any] = {"temperature": c.temperature, "alpha": c.alpha}
        if isinstance(c.student, ModelConfig):
            details["student"] = self._replace_student(state, c.student)
        else:
            details["student"] = "current"
        student = state.model
        need_teacher = c.alpha > 0 or bool(c.features)
        teacher = None
        if need_teacher:
            teacher, details["teacher"] = self._teacher(state)
            x0 = state.data.example_input(2).to(state.device)
            with torch.no_grad():
                was = student.training
                student.eval()
                ts, ss = tuple(teacher(x0).shape), tuple(student(x0).shape)
                student.train(was)
            if ts != ss:
                raise StageError(
                    f"teacher outputs {list(ts[1:])} logits, the student {list(ss[1:])}: they must agree"
                )

        dataset = state.data.train_dataset
        labelled = state.data.labelled and has_labels(dataset)
        if c.alpha < 1 and not labelled:
            raise StageError(
                "the training data has no labels: use alpha: 1 (pure distillation) or labelled data"
            )
        bs = state.resolve(c.batch_size, "batch_size") if c.batch_size is not None else None
        T, alpha, smooth = c.temperature, c.alpha, c.label_smoothing

        matcher = None
        if c.features:
            assert teacher is not None
            pairs = [(f.student, f.teacher, f.weight) for f in c.features]
            matcher = FeatureMatcher(
                student, teacher, pairs, state.data.example_input(2).to(state.device), state.device
            )
            details["features"] = matcher.shapes

        loader = None
        loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
        if c.cache_teacher and c.alpha > 0:
            assert teacher is not None
            n = len(dataset)  # type: ignore[arg-type]
            state.ctx.listener.on_message(f"{self.name}: caching the teacher's logits over {n} samples")
            cached_logits, cached_labels = teacher_logit_cache(
                teacher, dataset, state.device, state.data.eval_batch_size, state.data.num_workers
            )
            details["teacher_cache"] = {"samples": int(cached_logits.shape[0])}
            loader = train_loader(state, IndexedDataset(dataset), bs)

            def cached_loss(logits: torch.Tensor, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
                return kd_loss(
                    logits, cached_logits[idx], cached_labels[idx] if alpha < 1 else None, T, alpha, smooth
                )

            loss_fn = cached_loss
        else:
            if not has_labels(dataset):
                loader = train_loader(state, LabelledView(dataset), bs)

            def live_loss(logits: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
                t_logits = None
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(x)
                loss = kd_loss(
                    logits, t_logits if alpha > 0 else None, y if alpha < 1 else None, T, alpha, smooth
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

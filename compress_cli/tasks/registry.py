"""The task registry: built-in tasks register their class under ``task.type``; a custom task comes
from ``task.source`` (``package.module:callable``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from compress_cli.errors import RecipeError, did_you_mean

if TYPE_CHECKING:
    from compress_cli.config.recipe import TaskConfig
    from compress_cli.tasks.base import Task

T = TypeVar("T", bound=type)

_TASKS: dict[str, type[Task]] = {}

#: members a custom task object must have (the protocol of compress_cli.tasks.base.Task)
PROTOCOL = (
    "name",
    "primary",
    "higher_is_better",
    "needs_labels",
    "needs_reference",
    "split",
    "select",
    "forward",
    "loss",
    "evaluator",
    "check_output",
    "report_fields",
)


def register_task(cls: T) -> T:
    """Class decorator: register a built-in task under its ``name``."""
    name = cls.name  # type: ignore[attr-defined]
    if name in _TASKS:
        raise ValueError(f"task {name!r} is registered twice")
    _TASKS[name] = cls  # type: ignore[assignment]
    return cls


def task_classes() -> dict[str, type[Task]]:
    """Every built-in task class by name (importing the built-in task modules)."""
    import compress_cli.tasks.builtin  # noqa: F401 - registers the built-in tasks

    return dict(_TASKS)


def build_task(cfg: TaskConfig, num_classes: int | None = None, *, trust_code: bool = True) -> Task:
    """The task a recipe's ``task:`` section describes. A custom one is built by calling
    ``task.source`` with the task config (its ``kwargs`` as keyword arguments) and is checked
    against the protocol."""
    if cfg.type != "custom":
        classes = task_classes()
        if cfg.type not in classes:
            raise RecipeError(f"task.type: unknown task {cfg.type!r}{did_you_mean(cfg.type, classes)}")
        return classes[cfg.type](cfg, num_classes)
    from compress_cli._utils.plugins import load_callable

    assert cfg.source is not None
    factory = load_callable(cfg.source, "task.source")
    try:
        task: Any = factory(cfg, num_classes)
    except Exception as e:
        raise RecipeError(
            f"task.source {cfg.source}: building the task failed: {type(e).__name__}: {e}"
        ) from e
    missing = [m for m in PROTOCOL if not hasattr(task, m)]
    if missing:
        raise RecipeError(
            f"task.source {cfg.source}: the object it returned ({type(task).__name__}) lacks "
            f"{', '.join(missing)}; subclass compress_cli.tasks.Task (see CONTRIBUTING.md)"
        )
    if not hasattr(task, "reference"):
        task.reference = None
    return task

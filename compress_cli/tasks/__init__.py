"""Tasks: how a model is fed, scored and trained (see :mod:`compress_cli.tasks.base`)."""

from compress_cli.tasks.base import Evaluator, Reference, Task
from compress_cli.tasks.registry import build_task, register_task, task_classes

__all__ = ["Evaluator", "Reference", "Task", "build_task", "register_task", "task_classes"]

"""Tasks: data loaders, prompt templates and graders. Importing this registers every task."""

from fedsb.tasks import arithmetic, commonsense, holdout, nli, sft, synthetic  # noqa: F401  (registration)
from fedsb.tasks.base import EvalExample, Example, Task, get_task, register_task, task_names

__all__ = ["EvalExample", "Example", "Task", "get_task", "register_task", "task_names"]

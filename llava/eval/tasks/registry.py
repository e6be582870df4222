"""Tasks by name, lm-evaluation-harness style: adding a benchmark is one module here calling `register_task`."""

from __future__ import annotations

import importlib
import pkgutil

from llava.eval.tasks.base import Task

TASKS: dict[str, Task] = {}
NOT_TASK_MODULES = frozenset({"base", "registry"})


def register_task(task: Task) -> Task:
    """Add `task` under its name; a second task with the same name is refused."""
    if task.name in TASKS:
        raise ValueError(f"task {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def discover_tasks() -> dict[str, Task]:
    """Import every task module of llava/eval/tasks so that each one's register_task has run."""
    import llava.eval.tasks as package

    for module in pkgutil.iter_modules(package.__path__):
        if module.name not in NOT_TASK_MODULES:
            importlib.import_module(f"{package.__name__}.{module.name}")
    return TASKS


def get_task(name: str) -> Task:
    """The task registered as `name`; an unknown name is a ValueError listing the valid ones."""
    tasks = discover_tasks()
    if name not in tasks:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(tasks))}")
    return tasks[name]

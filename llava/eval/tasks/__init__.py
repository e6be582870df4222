"""Benchmarks as tasks, one module each, registered by name (see registry.py, base.py)."""

from llava.eval.tasks.base import DataInput, RunPaths, Task
from llava.eval.tasks.registry import TASKS, discover_tasks, get_task, register_task

__all__ = ["DataInput", "RunPaths", "TASKS", "Task", "discover_tasks", "get_task", "register_task"]

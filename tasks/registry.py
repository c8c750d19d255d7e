"""The task registry: name -> factory, with what `symzoo tasks` shows."""

from __future__ import annotations

from typing import Any, Callable

from tasks.base import Task, TaskError, TaskInfo

TASKS: dict[str, TaskInfo] = {}


def register_task(name: str, *, description: str, group: str, options: dict | None = None,
                  per_model: str | None = None) -> Callable:
    """Decorator for a factory `f(**options) -> Task`; `options` maps option name -> allowed values or type.

    `per_model` names the generating factor that picks each model's own data (tasks.inr: "image").
    """

    def deco(factory: Callable[..., Task]) -> Callable[..., Task]:
        TASKS[name] = TaskInfo(name, factory, description, group, dict(options or {}), per_model)
        return factory

    return deco


def get_task(name: str, **options: Any) -> Task:
    """Build a registered task; unknown names are refused with the list of tasks."""
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    task = TASKS[name].factory(**options)
    task._config = {"name": name, **options}
    return task


def task_with_data(name: str, options: dict[str, Any], data_dir: str | None = None) -> Task:
    """`get_task`, handing `data_dir` to file-backed tasks that were not given one (studies set it once)."""
    options = dict(options)
    if name in TASKS and data_dir is not None and "data_dir" in TASKS[name].options:
        options.setdefault("data_dir", data_dir)
    return get_task(name, **options)

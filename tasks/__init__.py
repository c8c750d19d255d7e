"""Learning problems with a known symmetry group: data, the group, its action on inputs and outputs."""

from tasks.base import SPLITS, Task, TaskError, TaskInfo
from tasks.groups import FiniteGroup, Group, LieGroup
from tasks.registry import TASKS, get_task, register_task, task_with_data

# Importing the task modules registers their tasks.
from tasks import images as _images  # noqa: E402,F401
from tasks import generated as _generated  # noqa: E402,F401
from tasks import inr as _inr  # noqa: E402,F401

__all__ = ["SPLITS", "Task", "TaskError", "TaskInfo", "Group", "FiniteGroup", "LieGroup", "TASKS", "get_task", "register_task", "task_with_data"]

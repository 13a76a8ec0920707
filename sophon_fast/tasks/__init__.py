"""Tasks: what protect needs to know about a kind of model (see ``base.Task``), by name."""
from typing import Callable, Dict

from sophon_fast.tasks.base import Batch, Task, reinit_linear_  # noqa: F401
from sophon_fast.tasks.classification import ClassificationTask, accuracy, find_head  # noqa: F401

TASKS: Dict[str, Callable[[], Task]] = {"classification": ClassificationTask}


def make_task(name: str) -> Task:
    """The task registered as ``name`` with its default settings; ValueError for an unknown name."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; one of {sorted(TASKS)}")
    return TASKS[name]()

"""Tasks: what protect needs to know about a kind of model (see ``base.Task``), by name."""
import importlib
from typing import Dict

from sophon_fast.tasks.base import Batch, Task, reinit_linear_  # noqa: F401
from sophon_fast.tasks.classification import ClassificationTask, accuracy, find_head  # noqa: F401

# name -> "module:Class", imported on first use (the LM and diffusion tasks pull in optional packages)
TASKS: Dict[str, str] = {
    "classification": "sophon_fast.tasks.classification:ClassificationTask",
    "lm": "sophon_fast.tasks.lm:LanguageModelTask",
    "diffusion": "sophon_fast.tasks.diffusion:DiffusionTask",
}


def task_class(name: str) -> type:
    """The Task class registered as ``name``; ValueError for an unknown name."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; one of {sorted(TASKS)}")
    module, cls = TASKS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_task(name: str, **options) -> Task:
    """The task registered as ``name``, built with ``options``."""
    return task_class(name)(**options)


def __getattr__(name):          # sophon_fast.tasks.LanguageModelTask / DiffusionTask, imported lazily
    lazy = {"LanguageModelTask": "lm", "DiffusionTask": "diffusion"}
    if name in lazy:
        return task_class(lazy[name])
    raise AttributeError(f"module 'sophon_fast.tasks' has no attribute {name!r}")

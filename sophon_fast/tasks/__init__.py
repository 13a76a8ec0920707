"""Tasks: what protect needs to know about a kind of model (see ``base.Task``)."""
from sophon_fast.tasks.base import Batch, Task  # noqa: F401
from sophon_fast.tasks.lm import LanguageModelTask  # noqa: F401

"""The protection loop: configuration, the reference and fast meta-gradient modes, the outer loop."""
from sophon_fast.engine.config import Checkpointing, Evaluation, ProtectConfig, Strategy  # noqa: F401
from sophon_fast.engine.loop import NonFiniteError, ProtectResult, protect  # noqa: F401

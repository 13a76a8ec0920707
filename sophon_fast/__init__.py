"""sophon_fast: SOPHON non-fine-tunable learning with fused kernels.

Public API: ``protect``/``ProtectConfig``/``Strategy``/``Evaluation``/``Checkpointing`` (the SOPHON loop),
``functional`` (losses), ``tasks`` (classification and other model kinds), ``defences`` (optional
components such as the dead-unit trap), ``attacks`` (fine-tuning attacks and metrics), ``models``,
``data``, ``recipes`` (the measured settings: adaptive, trap, language_model, diffusion), ``io``
(``save_model``/``load_model``), ``audit`` (the attack-search release gate, :mod:`sophon_fast.audit`; needs
optuna), ``backend_report``/``set_backend``/``use_backend``.
"""
from sophon_fast import ops  # noqa: F401  (registers torch.ops.sophon_fast.*)
from sophon_fast import functional  # noqa: F401
from sophon_fast._backend import BackendError, backend_report, set_backend, use_backend  # noqa: F401
from sophon_fast.engine import (Checkpointing, Evaluation, NonFiniteError, ProtectConfig, ProtectResult,  # noqa: F401
                                Strategy, protect)
from sophon_fast import attacks, data, defences, io, models, recipes, tasks  # noqa: F401,E402
from sophon_fast.io import load_model, save_model  # noqa: F401,E402
from sophon_fast.audit import audit  # noqa: F401,E402  (the function; its package is sys.modules["sophon_fast.audit"])

__version__ = "0.1.0"

"""sophon_fast: SOPHON non-fine-tunable learning with fused kernels.

Public API: ``protect``/``ProtectConfig``/``Strategy`` (the SOPHON loop), ``functional`` (losses),
``backend_report``/``set_backend``/``use_backend`` (kernel backends).
"""
from sophon_fast import ops  # noqa: F401  (registers torch.ops.sophon_fast.*)
from sophon_fast import functional  # noqa: F401
from sophon_fast._backend import BackendError, backend_report, set_backend, use_backend  # noqa: F401
from sophon_fast.engine import NonFiniteError, ProtectConfig, ProtectResult, Strategy, protect  # noqa: F401

__version__ = "0.1.0"

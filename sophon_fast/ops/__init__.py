"""Custom ops (torch.library, namespace ``sophon_fast``); importing this registers them."""
from sophon_fast.ops import _cext  # noqa: F401  (registers the compiled backends with sophon_fast._backend)
from sophon_fast.ops.inner_step import inner_step_, inner_step_capturable_  # noqa: F401
from sophon_fast.ops.row_losses import row_losses, row_losses_backward  # noqa: F401
from sophon_fast.ops.linear_loss import linear_loss  # noqa: F401
from sophon_fast.ops.sq_mean import row_sq_mean  # noqa: F401

"""The reference backend: the specification functions, under the backend interface."""
from sophon_fast.reference.inner_step import inner_step_, inner_step_capturable_  # noqa: F401
from sophon_fast.reference.losses import row_losses_backward as row_losses_bwd  # noqa: F401
from sophon_fast.reference.losses import row_losses_forward as row_losses_fwd  # noqa: F401
from sophon_fast.reference.linear_loss import linear_loss_with_grads as linear_loss  # noqa: F401
from sophon_fast.reference.sq_mean import row_sq_mean  # noqa: F401

"""Plain-PyTorch specification of the fused inner optimiser step on flat buffers.

One call = one pass over the flat buffers of a simulated attacker's step, in place:

    kind SGD (0):      g = grad + wd*param;  param -= lr*g
    kind MOMENTUM (1): g = grad + wd*param;  buf = beta1*buf + g;  param -= lr*buf
                       (torch.optim.SGD with momentum=beta1, dampening 0: with buf starting at 0 the
                       first step gives buf = g, as torch's does)
    kind ADAM (2):     g = grad + wd*param;  m = beta1*m + (1-beta1)*g;  v = beta2*v + (1-beta2)*g^2
                       param -= (lr / (1-beta1^t)) * m / (sqrt(v)/sqrt(1-beta2^t) + eps)
                       (torch.optim.Adam, L2-style weight decay, t = ``step`` >= 1)
    zero_grad:         grad = 0 afterwards (the next backward accumulates into it)

``exp_avg`` is the momentum buffer for MOMENTUM and ``m`` for ADAM; ``exp_avg_sq`` is ``v`` (ADAM
only). Unused buffers may be any tensor; they are not touched. Traffic per element: SGD 2R+1W
(3R+2W with zero_grad counted as a write), MOMENTUM 3R+2W, ADAM 4R+3W.
"""
import math

import torch

SGD, MOMENTUM, ADAM = 0, 1, 2
KINDS = {"sgd": SGD, "momentum": MOMENTUM, "adam": ADAM}


@torch.no_grad()
def inner_step_(param, grad, exp_avg, exp_avg_sq, kind, lr, beta1, beta2, eps, weight_decay, step, zero_grad):
    g = grad if weight_decay == 0 else grad + weight_decay * param
    if kind == SGD:
        param.sub_(lr * g)
    elif kind == MOMENTUM:
        exp_avg.mul_(beta1).add_(g)
        param.sub_(lr * exp_avg)
    elif kind == ADAM:
        exp_avg.mul_(beta1).add_((1 - beta1) * g)
        exp_avg_sq.mul_(beta2).add_((1 - beta2) * g * g)
        bc1 = 1 - beta1 ** step
        bc2 = 1 - beta2 ** step
        denom = exp_avg_sq.sqrt() / math.sqrt(bc2) + eps
        param.sub_((lr / bc1) * exp_avg / denom)
    else:
        raise ValueError(f"unknown inner step kind {kind}")
    if zero_grad:
        grad.zero_()


@torch.no_grad()
def inner_step_capturable_(param, grad, exp_avg, exp_avg_sq, step, kind, lr, beta1, beta2, eps, weight_decay,
                           zero_grad):
    """``inner_step_`` with Adam's step counter as a one-element int64 tensor ``step`` on the buffers' device:
    ``step += 1``, then the step of number ``step``, with the bias corrections formed from the tensor (no host
    value depends on it: a CUDA graph can capture the call once and replay it)."""
    step.add_(1)
    g = grad if weight_decay == 0 else grad + weight_decay * param
    if kind != ADAM:
        inner_step_(param, grad, exp_avg, exp_avg_sq, kind, lr, beta1, beta2, eps, weight_decay, 1, zero_grad)
        return
    t = step.reshape(()).to(torch.float64)
    bc1 = 1 - torch.pow(beta1, t)
    sqrt_bc2 = (1 - torch.pow(beta2, t)).sqrt()
    exp_avg.mul_(beta1).add_((1 - beta1) * g)
    exp_avg_sq.mul_(beta2).add_((1 - beta2) * g * g)
    acc = torch.float64 if param.dtype == torch.float64 else torch.float32
    denom = exp_avg_sq.sqrt() / sqrt_bc2.to(acc) + eps
    param.sub_(((lr / bc1).to(acc) * exp_avg / denom).to(param.dtype))
    if zero_grad:
        grad.zero_()

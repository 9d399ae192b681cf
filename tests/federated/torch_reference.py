"""The torch twin of the hospital's NumPy DP-SGD engine (`federated.numpy_dp`): the reference
the tests and benchmarks compare it with, kept out of the production package because nothing
there runs it (a hospital trains with `federated.numpy_dp` through `federated.dp_round`; the
"opacus" engine, `federated.dp.run_opacus`, is Opacus's own per-sample gradients).

The mechanism is `federated.dp`'s (its module docstring). For templates made of `nn.Linear`
layers and element-wise activations a per-record gradient of layer l is the outer product
g_i a_i^T of the gradient at the layer's output and the layer's input, so its squared norm is
|g_i|^2 (|a_i|^2 + 1) (the +1 is the bias) and the clipped sum is (c * G)^T A: one forward, one
backward to the layer outputs and two small matrix products per layer, no per-sample gradient
tensors ("ghost clipping", the algebra of Opacus's grad_sample_mode="ghost"). The backward is
written out by hand for tanh/ReLU/sigmoid/identity (closed-form loss gradient
`Template.output_grad`), through autograd for other element-wise activations (GELU in the
tests). Survival's twin is `federated.dp.run_cox(engine="fast")`, which stays in production
because the "opacus" engine runs through the same loop.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from federated.dp import _NORM_EPS, _apply, step_noise
from federated.dp_types import PatientIndex
from federated.secure_random import SecureRandom
from federated.templates import Template


def clipped_grad_sum(model: nn.Sequential, template: Template, xb: torch.Tensor, yb: torch.Tensor,
                     clip: float) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Sum over the batch of per-record gradients each clipped to `clip` (one tensor per
    parameter, in `model.parameters()` order) and the per-record gradient norms before clipping
    (module docstring for the algebra)."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    if all(isinstance(m, nn.Linear) or type(m) in _DERIVATIVES for m in model):
        acts, grads_out = _backprop_manual(model, template, xb, yb)
    else:
        acts, grads_out = _backprop_autograd(model, template, xb, yb)
    sq = torch.zeros(xb.shape[0], dtype=xb.dtype)
    for a, g, m in zip(acts, grads_out, linears, strict=True):
        sq += (g * g).sum(1) * ((a * a).sum(1) + (1.0 if m.bias is not None else 0.0))
    norms = sq.sqrt()
    factor = (clip / (norms + _NORM_EPS)).clamp(max=1.0)
    result: list[torch.Tensor] = []
    for a, g, m in zip(acts, grads_out, linears, strict=True):
        gs = g * factor[:, None]
        result.append(gs.T @ a)
        if m.bias is not None:
            result.append(gs.sum(0))
    return result, norms


# Derivative of an activation given its input z and output h (all element-wise).
_DERIVATIVES: dict[type[nn.Module], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    nn.Tanh: lambda _z, h: 1.0 - h * h,
    nn.ReLU: lambda z, _h: (z > 0).to(z.dtype),
    nn.Sigmoid: lambda _z, h: h * (1.0 - h),
    nn.Identity: lambda z, _h: torch.ones_like(z),
}


def _backprop_manual(model: nn.Sequential, template: Template, xb: torch.Tensor,
                     yb: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Inputs of every Linear layer and the loss gradient at every Linear layer's output,
    computed by hand (closed-form loss gradient, element-wise activation derivatives): the
    per-step cost of autograd's graph is most of the time for models this small
    (`federated.numpy_mlp.NumpyMLP` does the same in NumPy)."""
    inputs: list[torch.Tensor] = []
    trace: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
    h = xb
    for m in model:
        z = h
        if isinstance(m, nn.Linear):
            inputs.append(z)
            h = nn.functional.linear(z, m.weight.detach(), None if m.bias is None else m.bias.detach())
        else:
            h = m(z)
        trace.append((m, z, h))
    g = template.output_grad(h, yb)
    if g.ndim == 1:
        g = g[:, None]
    grads_out: list[torch.Tensor] = []
    for i in range(len(trace) - 1, -1, -1):
        m, z, h = trace[i]
        if isinstance(m, nn.Linear):
            grads_out.append(g)
            if i > 0:
                g = g @ m.weight.detach()
        else:
            g = g * _DERIVATIVES[type(m)](z, h)
    grads_out.reverse()
    return inputs, grads_out


def _backprop_autograd(model: nn.Sequential, template: Template, xb: torch.Tensor,
                       yb: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """As `_backprop_manual`, through autograd (any element-wise activation)."""
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    h = xb
    with torch.enable_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                inputs.append(h.detach())
                z = nn.functional.linear(h, m.weight.detach(),
                                         None if m.bias is None else m.bias.detach())
                if not z.requires_grad:
                    z.requires_grad_(True)
                outputs.append(z)
                h = z
            else:
                h = m(h)
        loss = template.per_sample_loss(h, yb).sum()
        grads = torch.autograd.grad(loss, outputs)
    return inputs, list(grads)


def run_fast(model: nn.Sequential, tpl: Template, x: torch.Tensor, y: torch.Tensor, *,
             index: PatientIndex, rng: SecureRandom, sigma: float, q: float, steps: int,
             clip: float, lr: float, momentum: float, expected_batch: float | None = None) -> None:
    """`steps` DP-SGD steps on `model` in place: `federated.numpy_dp.run`'s steps in torch (the
    same sampling and noise draws from `rng`, the same clipped sum and update)."""
    params = list(model.parameters())
    expected_batch = q * index.n_patients if expected_batch is None else expected_batch
    bufs: list[torch.Tensor | None] = [None] * len(params)
    with torch.no_grad():
        for _ in range(steps):
            idx = torch.from_numpy(index.sample(q, rng))
            if idx.numel() > 0:
                summed, _ = clipped_grad_sum(model, tpl, x[idx], y[idx], clip)
            else:
                summed = [torch.zeros_like(p) for p in params]
            noise = step_noise(rng, params, sigma * clip) if sigma > 0 else None
            _apply(params, summed, noise, expected_batch=expected_batch, lr=lr, momentum=momentum, bufs=bufs)

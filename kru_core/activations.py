"""Nonlinearities for (complex) recurrent states, with hand-written backward passes.

The paper does not say which nonlinearity KRU uses on complex states (``docs/paper.md`` 1.4, [NR]);
both candidates are here, behind the ``activation`` argument of :class:`kru_core.KRU`:

* ``"modrelu"`` (uRNN's): ``sigma(z) = relu(|z| + b) * z / (|z| + eps)`` with a learned real bias
  ``b`` per unit. On real states it is ``relu(|z| + b) * sign(z)`` (up to ``eps``).
* ``"split_relu"``: ReLU on the real and imaginary parts separately (plain ReLU on real states).
* ``"tanh"``: real states only.
* ``"identity"``: no nonlinearity (a linear recurrence; used by tests).

:func:`activation_backward` gives the gradient of each in PyTorch's convention for complex tensors
(the gradient of a real loss is ``dL/dRe z + i dL/dIm z``), for the fused recurrence in
:mod:`kru_core.kru`; :mod:`tests.core.test_kru` checks it against autograd.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "ACTIVATIONS",
    "MODRELU_EPS",
    "activation_backward",
    "apply_activation",
    "complex_abs",
    "modrelu",
    "split_relu",
]

#: Names accepted by ``activation=``.
ACTIVATIONS = ("modrelu", "split_relu", "tanh", "identity")

#: ``eps`` in modReLU's ``z / (|z| + eps)``: EURNN's value. Near ``z = 0`` with ``b > 0`` the
#: derivative is about ``b / eps`` (``docs/speed.md`` pitfall 5), so :class:`kru_core.KRU` keeps
#: its bias at ``b <= 0``.
MODRELU_EPS = 1e-5


# Below this many elements an op costs its dispatch, and one torch.abs beats mul + sqrt.
_FAST_ABS_MIN_NUMEL = 4096


def complex_abs(z: Tensor, *, out: Tensor | None = None) -> Tensor:
    """``|z|``, fast: ``sqrt(Re(z conj z))`` for large complex ``z`` (about 2x quicker than
    ``torch.abs`` on CPU, which guards against overflow beyond ``1e19``); ``torch.abs`` for
    small or real ``z`` and while autograd records ``z`` (its gradient at ``z = 0`` is 0, the
    square root's is not)."""
    if (
        not z.is_complex()
        or z.numel() < _FAST_ABS_MIN_NUMEL
        or (z.requires_grad and torch.is_grad_enabled())
    ):
        return torch.abs(z, out=out) if out is not None else z.abs()
    return torch.sqrt(torch.mul(z, z.conj()).real, out=out)


def modrelu(z: Tensor, bias: Tensor | None, eps: float = MODRELU_EPS) -> Tensor:
    """uRNN's modReLU: ``relu(|z| + b) * z / (|z| + eps)``.

    Args:
        z: pre-activation, real or complex, ``(*, N)``.
        bias: real ``(N,)`` bias ``b`` (``None``: ``b = 0``).
        eps: stabiliser of the phase ``z / |z|``.

    Example::

        >>> z = torch.tensor([3 + 4j, 0.1j])
        >>> modrelu(z, torch.tensor([-1.0, -1.0]))
        tensor([2.4000+3.2000j, 0.0000+0.0000j])
    """
    r = complex_abs(z)
    m = r if bias is None else r + bias
    return z * (torch.relu(m) / (r + eps))


def split_relu(z: Tensor) -> Tensor:
    """ReLU applied to the real and imaginary parts separately (plain ReLU for real ``z``)."""
    if not z.is_complex():
        return torch.relu(z)
    return torch.view_as_complex(torch.relu(torch.view_as_real(z)))


def apply_activation(name: str, z: Tensor, bias: Tensor | None) -> Tensor:
    """``sigma(z)`` for ``name`` in :data:`ACTIVATIONS`; ``bias`` is only used by modReLU."""
    if name == "modrelu":
        return modrelu(z, bias)
    if name == "split_relu":
        return split_relu(z)
    if name == "tanh":
        return torch.tanh(z)
    if name == "identity":
        return z
    raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")


def activation_backward(
    name: str, z: Tensor, h: Tensor, grad_h: Tensor, bias: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """Gradient of ``h = sigma(z)`` for the fused recurrence.

    Args:
        name: the activation.
        z: the pre-activation saved by the forward pass.
        h: ``sigma(z)``.
        grad_h: gradient with respect to ``h`` (``dL/dRe h + i dL/dIm h`` when complex).
        bias: modReLU's bias, or ``None``.

    Returns:
        ``(grad_z, grad_bias_per_row)``: the gradient with respect to ``z`` and, for modReLU with
        a bias, the per-element gradient with respect to ``b`` (the caller sums it over rows).
    """
    if name == "identity":
        return grad_h, None
    if name == "tanh":
        return grad_h * (1 - h * h), None
    if name == "split_relu":
        if not z.is_complex():
            return grad_h * (z > 0), None
        mask = torch.view_as_real(z) > 0
        return torch.view_as_complex(torch.view_as_real(grad_h) * mask), None
    if name != "modrelu":
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {name!r}")
    # h = g(r) z with r = |z|, g = relu(r + b) / (r + eps). As a map of (Re z, Im z):
    #   grad_z = g grad_h + g'(r) Re(conj(grad_h) z) z / r,
    #   g'(r) = (1[r + b > 0] (r + eps) - relu(r + b)) / (r + eps)^2.
    r = z.abs()
    m = r if bias is None else r + bias
    active = m > 0
    denom = r + MODRELU_EPS
    g = torch.relu(m) / denom
    dg = (active.to(r.dtype) * denom - torch.relu(m)) / (denom * denom)
    proj = (grad_h.conj() * z).real if z.is_complex() else grad_h * z
    # d|z|/dz is z / r; at z = 0 the term vanishes (torch.abs's gradient there is 0).
    coef = torch.where(r > 0, dg * proj / r.clamp_min(torch.finfo(r.dtype).tiny), 0.0)
    grad_z = grad_h * g + z * coef
    grad_b = None if bias is None else proj * active.to(r.dtype) / denom
    return grad_z, grad_b

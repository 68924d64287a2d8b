"""The ``eager`` recurrence backend: the time loop in PyTorch ops (the reference path).

``h_t = act(W h_{t-1} + u_t)`` for every step, with ``W`` given as a plan's effective matrices
(:class:`~kru_core.kron.KronPlan`). With gradients enabled the loop is one
``torch.autograd.Function`` (:class:`_FusedRecurrence`): the forward writes every intermediate
into preallocated buffers without autograd bookkeeping and the backward is a hand-written BPTT
loop (the activation's derivative, then the adjoint factors), accumulating each effective
factor's gradient with one GEMM per step. Without gradients, :func:`_inference_loop` runs the
steps into preallocated buffers. ``fused=False`` records every step with autograd (the reference
the fused loop is checked against). ``docs/speed.md`` section 3.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..activations import (
    MODRELU_EPS,
    activation_backward,
    apply_activation,
    complex_abs,
)
from ..kron import apply_kron_factors

__all__ = ["eager_recurrence"]


class _Chain:
    """Precomputed views for applying a plan's matrices to ``(B, N)`` states step by step.

    Factor ``k`` maps ``x_k`` (``(rows_k, Q_k, tr_k)``) to ``x_{k+1}`` (``(rows_k, P_k, tr_k)``)
    with ``rows_k = B prod_{j<k} P_j`` and ``tr_k = prod_{j>k} Q_j`` (the last factor is one
    GEMM). The fused recurrence writes every ``x_k`` straight into preallocated buffers (``out=``)
    and accumulates factor gradients with one ``addmm``/``baddbmm`` per factor and step.
    """

    def __init__(self, mats: Sequence[Tensor], batch: int) -> None:
        self.mats = list(mats)
        self.k = len(mats)
        self.rows: list[int] = []
        self.trailing: list[int] = []
        rows = batch
        qs = [m.shape[1] for m in mats]
        for k, m in enumerate(mats):
            self.rows.append(rows)
            self.trailing.append(math.prod(qs[k + 1 :]))
            rows *= m.shape[0]

    @functools.cached_property
    def adjoint(self) -> list[Tensor]:
        """``W_k^H`` without a lazy conjugation bit (BLAS gets plain operands)."""
        return [m.mH.contiguous() for m in self.mats]

    @functools.cached_property
    def conj(self) -> list[Tensor]:
        """``conj(W_k)``, materialised."""
        return [m.conj().resolve_conj() for m in self.mats]

    def step_buffers(self, steps: int | None, like: Tensor) -> list[Tensor]:
        """Buffers for ``x_1 .. x_{K-1}`` (``(steps, size)`` each, or one step's if ``None``)."""
        lead = () if steps is None else (steps,)
        return [
            torch.empty(
                *lead,
                self.rows[k] * self.mats[k].shape[1] * self.trailing[k],
                dtype=like.dtype,
                device=like.device,
            )
            for k in range(1, self.k)
        ]

    def sizes(self, k: int) -> tuple[int, int, int, int]:
        p, q = self.mats[k].shape
        return self.rows[k], p, q, self.trailing[k]

    def forward_step(self, x: Tensor, u_t: Tensor, dests: Sequence[Tensor]) -> Tensor:
        """Write ``x_1, ..., x_K = W x + u_t`` into ``dests`` (flat per-step buffers)."""
        for k in range(self.k):
            rows, p, q, tr = self.sizes(k)
            dest = dests[k]
            if k == self.k - 1:
                torch.addmm(
                    u_t.view(rows, p), x.view(rows, q), self.mats[k].mT, out=dest.view(rows, p)
                )
            else:
                torch.matmul(self.mats[k], x.view(rows, q, tr), out=dest.view(rows, p, tr))
            x = dest
        return x

    def backward_step(
        self, g: Tensor, xs: Sequence[Tensor], accs: Sequence[Tensor], need_input: bool
    ) -> Tensor | None:
        """Accumulate factor gradients for one step; return the gradient for the step's input.

        ``g`` is the gradient for ``x_K``; ``xs[k]`` is ``x_k`` as saved by the forward pass.
        """
        for k in range(self.k - 1, -1, -1):
            rows, p, q, tr = self.sizes(k)
            if tr == 1:
                g2 = g.view(rows, p)
                # conj(grad W_k) += g^H x_k: a plain GEMM on the natural layout.
                torch.addmm(accs[k], g2.mH, xs[k].view(rows, q), out=accs[k])
                if k == 0 and not need_input:
                    return None
                g = g2 @ self.conj[k]
            else:
                g3 = g.view(rows, p, tr)
                # grad W_k += sum_r g_r x_r^H, summed over r after the loop.
                torch.baddbmm(accs[k], g3, xs[k].view(rows, q, tr).mH, out=accs[k])
                if k == 0 and not need_input:
                    return None
                g = self.adjoint[k] @ g3
        return g.reshape(self.rows[0], -1)

    def new_accumulators(self) -> list[Tensor]:
        accs = []
        for k, m in enumerate(self.mats):
            rows, p, q, tr = self.sizes(k)
            shape = (p, q) if tr == 1 else (rows, p, q)
            accs.append(torch.zeros(shape, dtype=m.dtype, device=m.device))
        return accs

    def finish_grads(self, accs: Sequence[Tensor]) -> list[Tensor]:
        out = []
        for k, acc in enumerate(accs):
            out.append(acc.conj().resolve_conj() if self.trailing[k] == 1 else acc.sum(0))
        return out


class _FusedRecurrence(torch.autograd.Function):
    """``h_t = act(W h_{t-1} + u_t)`` for all t with a hand-written BPTT backward.

    Inputs: activation name, ``u`` ``(T, B, N)`` (input term, additive bias included), ``h0``
    ``(B, N)``, modReLU ``bias`` (real ``(N,)`` or ``None``), and the plan's effective matrices.
    Output: all states ``(T, B, N)``. The forward keeps, per step, each factor's input and (for
    modReLU) the pre-activation and two real coefficients of the derivative, so the backward
    step is a handful of elementwise ops plus two matmuls per effective factor.
    """

    @staticmethod
    def forward(
        ctx: Any, activation: str, u: Tensor, h0: Tensor, bias: Tensor | None, *mats: Tensor
    ):  # type: ignore[override]
        steps, batch, _ = u.shape
        chain = _Chain(mats, batch)
        out = torch.empty_like(u)
        # x_1 .. x_{K-1} for every step (the inputs of factors 1..K-1), then z (pre-activation).
        inner = chain.step_buffers(steps, u)
        zs = torch.empty_like(u)
        modrelu = activation == "modrelu"
        if modrelu:
            scale = torch.empty(u.shape, dtype=h0.real.dtype, device=u.device)
            coef = torch.empty_like(scale)
            bgrad = torch.empty_like(scale)
            eps_minus_b = MODRELU_EPS - (
                bias if bias is not None else torch.zeros_like(scale[0, 0])
            )
            per_step = zip(scale.unbind(0), coef.unbind(0), bgrad.unbind(0), strict=True)
        inner_steps = list(zip(*(buf.unbind(0) for buf in inner), strict=True)) or [()] * steps
        h = h0
        for t, (u_t, z_t, h_t) in enumerate(
            zip(u.unbind(0), zs.unbind(0), out.unbind(0), strict=True)
        ):
            z = chain.forward_step(h, u_t, [*inner_steps[t], z_t])
            if modrelu:
                _modrelu_forward(z, bias, eps_minus_b, h_t, *next(per_step))
            else:
                h_t.copy_(apply_activation(activation, z, bias))
            h = h_t
        ctx.activation = activation
        ctx.chain = chain
        saved = [zs, out, h0, *inner]
        if modrelu:
            saved += [scale, coef, bgrad]
        ctx.n_inner = len(inner)
        ctx.save_for_backward(*saved)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor):  # type: ignore[override]
        zs, out, h0, *rest = ctx.saved_tensors
        inner, rest = rest[: ctx.n_inner], rest[ctx.n_inner :]
        chain: _Chain = ctx.chain
        activation = ctx.activation
        modrelu = activation == "modrelu"
        steps = out.shape[0]
        need_mats = any(ctx.needs_input_grad[4:])
        accs = chain.new_accumulators()
        grad_u = torch.empty_like(out)
        grad_bias_rows = (
            torch.zeros(out.shape[1:], dtype=h0.real.dtype, device=h0.device)
            if (modrelu and ctx.has_bias)
            else None
        )
        grad_h: Tensor | None = None
        for t in range(steps - 1, -1, -1):
            g = grad_out[t] if grad_h is None else grad_out[t] + grad_h
            gz = grad_u[t]
            if modrelu:
                scale, coef, bgrad = rest
                _modrelu_backward(zs[t], g, scale[t], coef[t], bgrad[t], gz, grad_bias_rows)
            else:
                gz.copy_(activation_backward(activation, zs[t], out[t], g, None)[0])
            prev = out[t - 1] if t > 0 else h0
            xs = [prev] + [buf[t] for buf in inner]
            if need_mats:
                grad_h = chain.backward_step(
                    gz, xs, accs, need_input=t > 0 or ctx.needs_input_grad[2]
                )
            else:
                grad_h = _apply_adjoint(chain, gz)
        grad_bias = grad_bias_rows.sum(0) if grad_bias_rows is not None else None
        grad_mats = chain.finish_grads(accs) if need_mats else [None] * chain.k
        return (None, grad_u, grad_h, grad_bias, *grad_mats)


def _apply_adjoint(chain: _Chain, g: Tensor) -> Tensor:
    for k in range(chain.k - 1, -1, -1):
        rows, p, _, tr = chain.sizes(k)
        g = g.view(rows, p) @ chain.conj[k] if tr == 1 else chain.adjoint[k] @ g.view(rows, p, tr)
    return g.reshape(chain.rows[0], -1)


def _modrelu_forward(
    z: Tensor,
    bias: Tensor | None,
    eps_minus_b: Tensor,
    h: Tensor,
    scale: Tensor,
    coef: Tensor,
    bgrad: Tensor,
) -> None:
    """modReLU into ``h`` plus what its backward needs (see ``activation_backward``):
    ``scale = relu(r + b) / den``, ``coef = 1[r+b>0] (eps - b) / (den^2 r)``,
    ``bgrad = 1[r+b>0] / den`` with ``r = |z|`` and ``den = r + eps``."""
    r = complex_abs(z)
    m = r + bias if bias is not None else r.clone()
    active = m > 0
    den = r + MODRELU_EPS
    torch.div(m.relu_(), den, out=scale)
    torch.mul(z, scale, out=h)
    torch.div(active, den, out=bgrad)
    torch.mul(bgrad, eps_minus_b, out=coef)
    coef.div_(den.mul_(r.clamp_min_(torch.finfo(r.dtype).tiny)))


def _modrelu_backward(
    z: Tensor,
    g: Tensor,
    scale: Tensor,
    coef: Tensor,
    bgrad: Tensor,
    grad_z: Tensor,
    grad_bias_rows: Tensor | None,
) -> None:
    """``grad_z = g scale + z coef Re(conj(g) z)``; ``grad_b += Re(conj(g) z) bgrad``."""
    proj = (g.conj() * z).real
    torch.mul(g, scale, out=grad_z)
    grad_z.add_(z * (coef * proj))
    if grad_bias_rows is not None:
        grad_bias_rows.addcmul_(proj, bgrad)


def eager_recurrence(
    u: Tensor,
    h0: Tensor,
    mats: Sequence[Tensor],
    *,
    activation: str,
    bias: Tensor | None,
    fused: bool = True,
) -> Tensor:
    """All states of ``h_t = act(W h_{t-1} + u_t)``, ``(T, B, N)``, for effective matrices ``mats``.

    With ``fused=True`` and gradients needed, one :class:`torch.autograd.Function` covers the
    whole loop; otherwise a plain loop (recorded by autograd step by step when it needs to).
    """
    needs_grad = torch.is_grad_enabled() and (
        u.requires_grad
        or h0.requires_grad
        or (bias is not None and bias.requires_grad)
        or any(m.requires_grad for m in mats)
    )
    h0 = h0.contiguous()
    if fused and needs_grad:
        return _FusedRecurrence.apply(activation, u.contiguous(), h0, bias, *mats)
    if not needs_grad and all(m.dim() == 2 for m in mats):
        return _inference_loop(u.contiguous(), h0, mats, activation=activation, bias=bias)
    h = h0
    outs = []
    # unbind, not u[t]: one backward node for all steps instead of T full-size zero tensors.
    for u_t in u.unbind(0):
        h = apply_activation(activation, apply_kron_factors(h, mats, add=u_t), bias)
        outs.append(h)
    return torch.stack(outs)


def _inference_loop(
    u: Tensor, h0: Tensor, mats: Sequence[Tensor], *, activation: str, bias: Tensor | None
) -> Tensor:
    """The loop without autograd: every step writes into preallocated buffers (fewer ops and
    allocations per step, which is what a batch of one is bound by)."""
    _, batch, n = u.shape
    chain = _Chain(mats, batch)
    out = torch.empty_like(u)
    dests = [*chain.step_buffers(None, u), torch.empty_like(u[0])]
    z = dests[-1]
    real_dtype = h0.real.dtype if h0.is_complex() else h0.dtype
    r = torch.empty(batch, n, dtype=real_dtype, device=u.device)
    m = torch.empty_like(r)
    h = h0
    for u_t, h_t in zip(u.unbind(0), out.unbind(0), strict=True):
        chain.forward_step(h, u_t, dests)
        if activation == "modrelu":
            # relu(|z| + b) z / (|z| + eps), in place.
            complex_abs(z, out=r)
            if bias is not None:
                torch.add(r, bias, out=m)
            else:
                m.copy_(r)
            m.relu_().div_(r.add_(MODRELU_EPS))
            torch.mul(z, m, out=h_t)
        else:
            h_t.copy_(apply_activation(activation, z, bias))
        h = h_t
    return out

"""The ``"triton"`` recurrence backend: one persistent Triton kernel per sequence and direction.

``h_t = act(W h_{t-1} + u_t)`` for all ``T`` steps runs in **one launch** (forward) and its
BPTT in **one more** (backward), whatever ``T`` is; ``W = F_0 ⊗ F_1 ⊗ F_2`` is never built.

Tiling and what stays on chip
-----------------------------
* The grid is one program per **batch tile** of ``BB`` rows (``BB`` a power of two; on CUDA as
  small as the batch allows, down to one row, so that a batch spreads over the SMs; 16 under the
  interpreter, where fewer programs run faster). Rows never interact, so a program runs all
  ``T`` steps alone: no grid-wide synchronisation, only program-local barriers.
* A program keeps its tile's **state in registers** as a rank-4 block ``(BB, D_0, D_1, D_2)``,
  one axis per (effective) factor, each padded to a power of two (Triton blocks are powers of
  two; the padding is zero in the state and in the factors, so it stays zero through every
  activation). Complex numbers are two real blocks (real and imaginary parts).
* The **factors are loaded once** per launch into registers (both ``F_k^T`` for the forward and
  ``F_k`` for the adjoint), padded the same way. Calls with more than three factors are first
  merged into at most three with ``torch.kron`` (:func:`~kru_core.kron.default_merge`'s
  grouping; autograd carries the gradients back to the given factors); the backend's own plan
  (:func:`triton_plan`) asks the layers for that merge directly.
* Factor ``k`` is applied to axis ``k`` of the block: permute the axis last, reshape to
  ``(rows, Q_k)``, one small matmul with ``F_k^T``, reshape and permute back. The matmul is
  ``tl.dot`` (``input_precision="ieee"``, no TF32) when both padded sides are >= 16 and the
  dtype is float32, else a broadcast multiply and ``tl.sum`` (small factors, float64).
* Per step the kernel reads ``u_t`` and writes ``h_t``: nothing else leaves the chip. With
  rectangular factors the output layout (``P`` digits) differs from the next step's input layout
  (``Q`` digits), so ``h_t`` is read back from its own output slot in the ``Q`` layout (an
  L1/L2 hit, after a barrier); square factors keep the state in registers across steps.

Backward
--------
The BPTT kernel walks ``t = T-1 .. 0`` carrying ``dL/dh_t`` in registers. It **recomputes** each
step's factor inputs and pre-activation from ``h_{t-1}`` (the forward saves only the states
``h_0 .. h_T``, in one ``(T+1, B, N)`` buffer whose view ``[1:]`` is the output), applies the
activation's derivative (written to ``grad_u[t]``), then the adjoint factors in reverse order.
Factor gradients ``sum_{t, rows} g x^H`` accumulate in registers per program and are written
once, per program, to a partial buffer that one ``torch.sum`` reduces afterwards (deterministic;
no atomics); modReLU's bias gradient likewise.

Coverage and fallbacks
----------------------
Covered: float32, float64, complex64, complex128; modReLU, split ReLU, identity, and tanh on
real states; any factor shapes (odd, rectangular) that fit the register budget below after
merging into at most three factors. Not covered: half precision, a state tile larger than
:data:`MAX_STATE` elements, a broadcast matmul temporary above :data:`MAX_BROADCAST` elements
or a ``tl.dot`` side above :data:`MAX_DOT_SIDE`.

* On CUDA an uncovered call runs the **eager loop captured in a CUDA graph**
  (:func:`graphed_eager`: ``torch.cuda.CUDAGraph`` for inference,
  ``torch.cuda.make_graphed_callables`` for training; one graph per shape, cached), logged once
  per reason.
* On the CPU, tensors are accepted only under ``TRITON_INTERPRET=1`` (Triton's numpy interpreter:
  how the tests run this kernel on a machine without a GPU); anything else not covered falls
  back to ``"eager"`` through the registry's one log line.
* On CUDA Triton builds a small launcher with the system C compiler at first use; without one
  (``gcc``/``clang`` or ``$CC``) the backend is unavailable (the registry's fallback).

``docs/speed.md`` section 5 has the design notes.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..activations import MODRELU_EPS
from ..kron import KronPlan, default_merge, kron_matrix
from . import kernel_operands, needs_grad, register_backend
from .eager import eager_recurrence

__all__ = [
    "MAX_BROADCAST",
    "MAX_DOT_SIDE",
    "MAX_STATE",
    "TileConfig",
    "graphed_eager",
    "interpreting",
    "tile_config",
    "triton_plan",
    "triton_recurrence",
    "triton_supports",
]

logger = logging.getLogger(__name__)

#: Most elements (per real part) of one program's state tile ``BB x prod(padded sides)``.
MAX_STATE = 8192
#: Most elements of the temporary of a broadcast (non-``tl.dot``) factor matmul.
MAX_BROADCAST = 65536
#: Largest padded factor side applied with ``tl.dot``.
MAX_DOT_SIDE = 128
#: Most effective factors the kernel takes (the rank of its state block, less the batch axis).
SLOTS = 3
#: Largest batch tile.
MAX_TILE_ROWS = 16
# On CUDA, a tile's state in 32-bit words that one program holds without register spills (ptxas
# -v for sm_90, complex64 N=512 merged 16x32: one row on 8 warps, forward and backward, spill
# nothing; four rows spill in the backward).
_CUDA_TILE_WORDS = 1024

_ACTIVATION_CODES = {"modrelu": 0, "split_relu": 1, "tanh": 2, "identity": 3}
_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``, read by Triton
    when this module's kernels were defined)."""
    return bool(triton.knobs.runtime.interpret)


# The kernels read the flag when they are decorated (at import); remember that choice.
_INTERPRET = interpreting()


# --------------------------------------------------------------------------- kernel helpers


@triton.jit
def _mm(a, b, DOT: tl.constexpr):
    """``a @ b`` for 2-d ``a`` ``(M, K)`` and ``b`` ``(K, N)``."""
    if DOT:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.sum(a[:, :, None] * b[None, :, :], axis=1)


@triton.jit
def _mm_tn(a, b, DOT: tl.constexpr):
    """``a^T @ b`` for ``a`` ``(M, K)`` and ``b`` ``(M, N)``: ``(K, N)``."""
    if DOT:
        return tl.dot(tl.trans(a), b, input_precision="ieee")
    else:
        return tl.sum(a[:, :, None] * b[:, None, :], axis=0)


@triton.jit
def _mm_op(a, b, DOT: tl.constexpr, TN: tl.constexpr):
    """:func:`_mm_tn` if ``TN``, else :func:`_mm`."""
    if TN:
        return _mm_tn(a, b, DOT)
    else:
        return _mm(a, b, DOT)


@triton.jit
def _cmm(ar, ai, br, bi, DOT: tl.constexpr, COMPLEX: tl.constexpr, TN: tl.constexpr):
    """Complex ``a @ b`` (``a^T @ b`` if ``TN``) from split parts (real: ``ai``, ``bi``
    ignored, ``ci = cr``)."""
    cr = _mm_op(ar, br, DOT, TN)
    if COMPLEX:
        cr = cr - _mm_op(ai, bi, DOT, TN)
        ci = _mm_op(ar, bi, DOT, TN) + _mm_op(ai, br, DOT, TN)
    else:
        ci = cr
    return cr, ci


@triton.jit
def _to_rows(x, AXIS: tl.constexpr, BB: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
             D2: tl.constexpr):  # fmt: skip
    """``(BB, D0, D1, D2)`` -> ``(rows, D_AXIS)`` with axis ``AXIS`` (1..3) last."""
    if AXIS == 1:
        return tl.reshape(tl.permute(x, (0, 2, 3, 1)), (BB * D1 * D2, D0))
    elif AXIS == 2:
        return tl.reshape(tl.permute(x, (0, 1, 3, 2)), (BB * D0 * D2, D1))
    else:
        return tl.reshape(x, (BB * D0 * D1, D2))


@triton.jit
def _from_rows(y, AXIS: tl.constexpr, BB: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
               D2: tl.constexpr):  # fmt: skip
    """The inverse of :func:`_to_rows` for the block shape ``(BB, D0, D1, D2)``."""
    if AXIS == 1:
        return tl.permute(tl.reshape(y, (BB, D1, D2, D0)), (0, 3, 1, 2))
    elif AXIS == 2:
        return tl.permute(tl.reshape(y, (BB, D0, D2, D1)), (0, 1, 3, 2))
    else:
        return tl.reshape(y, (BB, D0, D1, D2))


@triton.jit
def _apply(xr, xi, wtr, wti, AXIS: tl.constexpr, BB: tl.constexpr, D0: tl.constexpr,
           D1: tl.constexpr, D2: tl.constexpr, OUT: tl.constexpr, DOT: tl.constexpr,
           COMPLEX: tl.constexpr):  # fmt: skip
    """Factor ``F`` (given as ``F^T``, ``(Q, OUT)``) applied to axis ``AXIS`` of the block
    ``(BB, D0, D1, D2)`` (``D_AXIS = Q``); that axis becomes ``OUT`` long."""
    ar = _to_rows(xr, AXIS, BB, D0, D1, D2)
    ai = _to_rows(xi, AXIS, BB, D0, D1, D2) if COMPLEX else ar
    yr, yi = _cmm(ar, ai, wtr, wti, DOT, COMPLEX, False)
    if AXIS == 1:
        yr = _from_rows(yr, AXIS, BB, OUT, D1, D2)
        yi = _from_rows(yi, AXIS, BB, OUT, D1, D2) if COMPLEX else yr
    elif AXIS == 2:
        yr = _from_rows(yr, AXIS, BB, D0, OUT, D2)
        yi = _from_rows(yi, AXIS, BB, D0, OUT, D2) if COMPLEX else yr
    else:
        yr = _from_rows(yr, AXIS, BB, D0, D1, OUT)
        yi = _from_rows(yi, AXIS, BB, D0, D1, OUT) if COMPLEX else yr
    return yr, yi


@triton.jit
def _grad_factor(gr, gi, xr, xi, AXIS: tl.constexpr, BB: tl.constexpr, G0: tl.constexpr,
                 G1: tl.constexpr, G2: tl.constexpr, X0: tl.constexpr, X1: tl.constexpr,
                 X2: tl.constexpr, DOT: tl.constexpr, COMPLEX: tl.constexpr):  # fmt: skip
    """``sum_rows g x^H`` over every axis but ``AXIS``: the gradient of the factor that maps
    block ``x`` ``(BB, X0, X1, X2)`` to block ``g``'s shape ``(BB, G0, G1, G2)``."""
    a_r = _to_rows(gr, AXIS, BB, G0, G1, G2)
    b_r = _to_rows(xr, AXIS, BB, X0, X1, X2)
    if COMPLEX:
        a_i = _to_rows(gi, AXIS, BB, G0, G1, G2)
        b_i = -_to_rows(xi, AXIS, BB, X0, X1, X2)
    else:
        a_i = a_r
        b_i = b_r
    return _cmm(a_r, a_i, b_r, b_i, DOT, COMPLEX, True)


@triton.jit
def _factor_backward(gr, gi, xr, xi, ar, ai, gwr, gwi, AXIS: tl.constexpr, BB: tl.constexpr,
                     G0: tl.constexpr, G1: tl.constexpr, G2: tl.constexpr, X0: tl.constexpr,
                     X1: tl.constexpr, X2: tl.constexpr, Q: tl.constexpr, DOT: tl.constexpr,
                     COMPLEX: tl.constexpr, NEED_W: tl.constexpr):  # fmt: skip
    """One factor of the adjoint, for the factor that maps block ``x`` ``(BB, X0, X1, X2)`` to
    block ``g``'s shape ``(BB, G0, G1, G2)`` along axis ``AXIS`` (``Q = X_AXIS``), given as its
    adjoint ``a``: ``(dL/dx, gw + sum_rows g x^H)`` (``gw`` unchanged unless ``NEED_W``)."""
    if NEED_W:
        dr, di = _grad_factor(gr, gi, xr, xi, AXIS, BB, G0, G1, G2, X0, X1, X2, DOT, COMPLEX)
        gwr = gwr + dr
        if COMPLEX:
            gwi = gwi + di
    yr, yi = _apply(gr, gi, ar, ai, AXIS, BB, G0, G1, G2, Q, DOT, COMPLEX)
    return yr, yi, gwr, gwi


@triton.jit
def _offsets(row0, B, S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr, BB: tl.constexpr,
             D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, N: tl.constexpr,
             C: tl.constexpr):  # fmt: skip
    """Element offsets (in reals) and mask of a ``(BB, D0, D1, D2)`` block of ``(B, N)`` states
    whose index digits have sizes ``(S0, S1, S2)`` (``n = (i0 S1 + i1) S2 + i2``)."""
    r = row0 + tl.arange(0, BB)[:, None, None, None]
    i0 = tl.arange(0, D0)[None, :, None, None]
    i1 = tl.arange(0, D1)[None, None, :, None]
    i2 = tl.arange(0, D2)[None, None, None, :]
    off = (r * N + (i0 * S1 + i1) * S2 + i2) * C
    mask = (r < B) & (i0 < S0) & (i1 < S1) & (i2 < S2)
    return off, mask


@triton.jit
def _load2(ptr, off, mask, COMPLEX: tl.constexpr):
    xr = tl.load(ptr + off, mask=mask, other=0.0)
    xi = tl.load(ptr + off + 1, mask=mask, other=0.0) if COMPLEX else xr
    return xr, xi


@triton.jit
def _store2(ptr, off, mask, xr, xi, COMPLEX: tl.constexpr):
    tl.store(ptr + off, xr, mask=mask)
    if COMPLEX:
        tl.store(ptr + off + 1, xi, mask=mask)


@triton.jit
def _load_factor(ptr, P: tl.constexpr, Q: tl.constexpr, SP: tl.constexpr, SQ: tl.constexpr,
                 TRANSPOSE: tl.constexpr, CONJ: tl.constexpr, COMPLEX: tl.constexpr):  # fmt: skip
    """Factor ``(P, Q)`` as a padded ``(SP, SQ)`` tile, or its transpose ``(SQ, SP)``; ``CONJ``
    negates the imaginary part."""
    C: tl.constexpr = 2 if COMPLEX else 1
    if TRANSPOSE:
        q = tl.arange(0, SQ)[:, None]
        p = tl.arange(0, SP)[None, :]
    else:
        p = tl.arange(0, SP)[:, None]
        q = tl.arange(0, SQ)[None, :]
    off = (p * Q + q) * C
    mask = (p < P) & (q < Q)
    wr, wi = _load2(ptr, off, mask, COMPLEX)
    if CONJ and COMPLEX:
        wi = -wi
    return wr, wi


@triton.jit
def _load_slot(ptr, P: tl.constexpr, Q: tl.constexpr, SP: tl.constexpr, SQ: tl.constexpr,
               TRANSPOSE: tl.constexpr, CONJ: tl.constexpr, COMPLEX: tl.constexpr,
               PRESENT: tl.constexpr):  # fmt: skip
    """:func:`_load_factor` for a slot that may hold no factor (``PRESENT`` false: a ``(1, 1)``
    placeholder, never read)."""
    if PRESENT:
        return _load_factor(ptr, P, Q, SP, SQ, TRANSPOSE, CONJ, COMPLEX)
    else:
        placeholder = tl.zeros((1, 1), tl.float32)
        return placeholder, placeholder


@triton.jit
def _modulus(zr, zi, COMPLEX: tl.constexpr):
    if COMPLEX:
        return tl.sqrt(zr * zr + zi * zi)
    else:
        return tl.abs(zr)


@triton.jit
def _activation(zr, zi, b, ACT: tl.constexpr, COMPLEX: tl.constexpr, HAS_BIAS: tl.constexpr,
                EPS: tl.constexpr):  # fmt: skip
    """``act(z)`` (``kru_core.activations.apply_activation``) on split parts."""
    if ACT == 0:  # modReLU: relu(|z| + b) z / (|z| + eps)
        r = _modulus(zr, zi, COMPLEX)
        m = r + b if HAS_BIAS else r
        s = tl.where(m > 0, m, 0.0) / (r + EPS)
        hr = zr * s
        hi = zi * s if COMPLEX else hr
    elif ACT == 1:  # split ReLU
        hr = tl.where(zr > 0, zr, 0.0)
        hi = tl.where(zi > 0, zi, 0.0) if COMPLEX else hr
    elif ACT == 2:  # tanh (real states)
        e = tl.exp(-2.0 * tl.abs(zr))
        t = (1.0 - e) / (1.0 + e)
        hr = tl.where(zr < 0, -t, t)
        hi = hr
    else:
        hr = zr
        hi = zi
    return hr, hi


@triton.jit
def _activation_backward(zr, zi, gr, gi, b, ACT: tl.constexpr, COMPLEX: tl.constexpr,
                         HAS_BIAS: tl.constexpr, EPS: tl.constexpr):  # fmt: skip
    """``(dL/dz, dL/db per element)`` for ``dL/dh = g`` (``activation_backward``'s formulas)."""
    gb = gr
    if ACT == 0:
        r = _modulus(zr, zi, COMPLEX)
        m = r + b if HAS_BIAS else r
        active = m > 0
        den = r + EPS
        s = tl.where(active, m, 0.0) / den
        proj = gr * zr + gi * zi if COMPLEX else gr * zr
        eps_minus_b = EPS - b if HAS_BIAS else EPS + 0.0 * r
        # d/dr [relu(r + b) / (r + eps)] = 1[r + b > 0] (eps - b) / (r + eps)^2; times d|z|/dz.
        dg = tl.where(active, eps_minus_b / (den * den), 0.0)
        coef = tl.where(r > 0, dg * proj / tl.where(r > 0, r, 1.0), 0.0)
        gzr = gr * s + zr * coef
        gzi = gi * s + zi * coef if COMPLEX else gzr
        gb = tl.where(active, proj / den, 0.0)
    elif ACT == 1:
        gzr = tl.where(zr > 0, gr, 0.0)
        gzi = tl.where(zi > 0, gi, 0.0) if COMPLEX else gzr
    elif ACT == 2:
        hr, _ = _activation(zr, zi, b, ACT, COMPLEX, HAS_BIAS, EPS)
        gzr = gr * (1.0 - hr * hr)
        gzi = gzr
    else:
        gzr = gr
        gzi = gi
    return gzr, gzi, gb


@triton.jit
def _step_input(states_ptr, u_ptr, t, row0, B, w0r, w0i, w1r, w1i, w2r, w2i,
                N: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                Q0: tl.constexpr, Q1: tl.constexpr, Q2: tl.constexpr, SP0: tl.constexpr,
                SP1: tl.constexpr, SP2: tl.constexpr, SQ0: tl.constexpr, SQ1: tl.constexpr,
                SQ2: tl.constexpr, BB: tl.constexpr, HAS0: tl.constexpr, HAS1: tl.constexpr,
                DOT0: tl.constexpr, DOT1: tl.constexpr, DOT2: tl.constexpr,
                COMPLEX: tl.constexpr):  # fmt: skip
    """Recompute step ``t``'s factor inputs ``x_0, x_1, x_2`` and ``z = W x_0 + u_t`` from
    ``h_{t-1} = states[t]`` (for the backward)."""
    C: tl.constexpr = 2 if COMPLEX else 1
    step = tl.cast(t, tl.int64) * (B * N * C)
    off_q, mask_q = _offsets(row0, B, Q0, Q1, Q2, BB, SQ0, SQ1, SQ2, N, C)
    x0r, x0i = _load2(states_ptr + step, off_q, mask_q, COMPLEX)
    if HAS0:
        x1r, x1i = _apply(x0r, x0i, w0r, w0i, 1, BB, SQ0, SQ1, SQ2, SP0, DOT0, COMPLEX)
    else:
        x1r = x0r
        x1i = x0i
    if HAS1:
        x2r, x2i = _apply(x1r, x1i, w1r, w1i, 2, BB, SP0, SQ1, SQ2, SP1, DOT1, COMPLEX)
    else:
        x2r = x1r
        x2i = x1i
    zr, zi = _apply(x2r, x2i, w2r, w2i, 3, BB, SP0, SP1, SQ2, SP2, DOT2, COMPLEX)
    off_p, mask_p = _offsets(row0, B, P0, P1, P2, BB, SP0, SP1, SP2, N, C)
    ur, ui = _load2(u_ptr + step, off_p, mask_p, COMPLEX)
    zr = zr + ur
    zi = zi + ui if COMPLEX else zr
    return x0r, x0i, x1r, x1i, x2r, x2i, zr, zi


# --------------------------------------------------------------------------- kernels


@triton.jit
def _forward_kernel(u_ptr, states_ptr, w0_ptr, w1_ptr, w2_ptr, bias_ptr, B, T,
                    N: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                    Q0: tl.constexpr, Q1: tl.constexpr, Q2: tl.constexpr, SP0: tl.constexpr,
                    SP1: tl.constexpr, SP2: tl.constexpr, SQ0: tl.constexpr, SQ1: tl.constexpr,
                    SQ2: tl.constexpr, BB: tl.constexpr, HAS0: tl.constexpr, HAS1: tl.constexpr,
                    DOT0: tl.constexpr, DOT1: tl.constexpr, DOT2: tl.constexpr,
                    COMPLEX: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                    SQUARE: tl.constexpr, EPS: tl.constexpr):  # fmt: skip
    """``states[t + 1] = act(W states[t] + u[t])`` for ``t < T``; ``states[0] = h0`` on entry.

    ``u``: ``(T, B, N)``, ``states``: ``(T + 1, B, N)`` (reals, or interleaved real/imag)."""
    C: tl.constexpr = 2 if COMPLEX else 1
    row0 = tl.program_id(0) * BB
    # The factors, once: F_k^T (Q_k, P_k) tiles in registers.
    w0r, w0i = _load_slot(w0_ptr, P0, Q0, SP0, SQ0, True, False, COMPLEX, HAS0)
    w1r, w1i = _load_slot(w1_ptr, P1, Q1, SP1, SQ1, True, False, COMPLEX, HAS1)
    w2r, w2i = _load_factor(w2_ptr, P2, Q2, SP2, SQ2, True, False, COMPLEX)
    off_q, mask_q = _offsets(row0, B, Q0, Q1, Q2, BB, SQ0, SQ1, SQ2, N, C)
    off_p, mask_p = _offsets(row0, B, P0, P1, P2, BB, SP0, SP1, SP2, N, C)
    if HAS_BIAS:
        i0 = tl.arange(0, SP0)[:, None, None]
        i1 = tl.arange(0, SP1)[None, :, None]
        i2 = tl.arange(0, SP2)[None, None, :]
        bmask = (i0 < P0) & (i1 < P1) & (i2 < P2)
        b = tl.load(bias_ptr + (i0 * P1 + i1) * P2 + i2, mask=bmask, other=0.0)[None, :, :, :]
    else:
        b = 0.0
    xr, xi = _load2(states_ptr, off_q, mask_q, COMPLEX)
    step_size = B * N * C
    for t in range(T):
        step = tl.cast(t, tl.int64) * step_size
        if HAS0:
            xr, xi = _apply(xr, xi, w0r, w0i, 1, BB, SQ0, SQ1, SQ2, SP0, DOT0, COMPLEX)
        if HAS1:
            xr, xi = _apply(xr, xi, w1r, w1i, 2, BB, SP0, SQ1, SQ2, SP1, DOT1, COMPLEX)
        zr, zi = _apply(xr, xi, w2r, w2i, 3, BB, SP0, SP1, SQ2, SP2, DOT2, COMPLEX)
        ur, ui = _load2(u_ptr + step, off_p, mask_p, COMPLEX)
        zr = zr + ur
        if COMPLEX:
            zi = zi + ui
        hr, hi = _activation(zr, zi, b, ACT, COMPLEX, HAS_BIAS, EPS)
        _store2(states_ptr + step + step_size, off_p, mask_p, hr, hi, COMPLEX)
        if SQUARE:
            xr = hr
            xi = hi
        else:
            # The next step reads h_t by its Q digits: back from its own slot.
            tl.debug_barrier()
            xr, xi = _load2(states_ptr + step + step_size, off_q, mask_q, COMPLEX)


@triton.jit
def _backward_kernel(grad_ptr, states_ptr, u_ptr, w0_ptr, w1_ptr, w2_ptr, bias_ptr,
                     grad_u_ptr, grad_h0_ptr, gw0_ptr, gw1_ptr, gw2_ptr, gbias_ptr, B, T,
                     N: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
                     Q0: tl.constexpr, Q1: tl.constexpr, Q2: tl.constexpr, SP0: tl.constexpr,
                     SP1: tl.constexpr, SP2: tl.constexpr, SQ0: tl.constexpr,
                     SQ1: tl.constexpr, SQ2: tl.constexpr, BB: tl.constexpr,
                     HAS0: tl.constexpr, HAS1: tl.constexpr, DOT0: tl.constexpr,
                     DOT1: tl.constexpr, DOT2: tl.constexpr, COMPLEX: tl.constexpr,
                     ACT: tl.constexpr, HAS_BIAS: tl.constexpr, SQUARE: tl.constexpr,
                     EPS: tl.constexpr, NEED_W: tl.constexpr):  # fmt: skip
    """BPTT of :func:`_forward_kernel`: ``grad_u`` ``(T, B, N)``, ``grad_h0`` ``(B, N)``, and per
    program partial sums of the factor gradients ``gw_k`` ``(programs, SP_k, SQ_k)`` and of the
    bias gradient ``gbias`` ``(programs, N)``."""
    C: tl.constexpr = 2 if COMPLEX else 1
    pid = tl.program_id(0)
    row0 = pid * BB
    # F_k^T for the recomputed forward, conj(F_k) (P_k, Q_k) for the adjoint.
    w0r, w0i = _load_slot(w0_ptr, P0, Q0, SP0, SQ0, True, False, COMPLEX, HAS0)
    a0r, a0i = _load_slot(w0_ptr, P0, Q0, SP0, SQ0, False, True, COMPLEX, HAS0)
    w1r, w1i = _load_slot(w1_ptr, P1, Q1, SP1, SQ1, True, False, COMPLEX, HAS1)
    a1r, a1i = _load_slot(w1_ptr, P1, Q1, SP1, SQ1, False, True, COMPLEX, HAS1)
    w2r, w2i = _load_factor(w2_ptr, P2, Q2, SP2, SQ2, True, False, COMPLEX)
    a2r, a2i = _load_factor(w2_ptr, P2, Q2, SP2, SQ2, False, True, COMPLEX)
    off_q, mask_q = _offsets(row0, B, Q0, Q1, Q2, BB, SQ0, SQ1, SQ2, N, C)
    off_p, mask_p = _offsets(row0, B, P0, P1, P2, BB, SP0, SP1, SP2, N, C)
    i0 = tl.arange(0, SP0)[:, None, None]
    i1 = tl.arange(0, SP1)[None, :, None]
    i2 = tl.arange(0, SP2)[None, None, :]
    bmask = (i0 < P0) & (i1 < P1) & (i2 < P2)
    boff = (i0 * P1 + i1) * P2 + i2
    b = tl.load(bias_ptr + boff, mask=bmask, other=0.0)[None, :, :, :] if HAS_BIAS else 0.0
    zero_p = tl.zeros((BB, SP0, SP1, SP2), grad_ptr.dtype.element_ty)
    ghr = zero_p
    ghi = zero_p
    gbias = zero_p
    g0r = tl.zeros((SP0, SQ0), zero_p.dtype)
    g0i = g0r
    g1r = tl.zeros((SP1, SQ1), zero_p.dtype)
    g1i = g1r
    g2r = tl.zeros((SP2, SQ2), zero_p.dtype)
    g2i = g2r
    step_size = B * N * C
    for s in range(T):
        t = T - 1 - s
        step = tl.cast(t, tl.int64) * step_size
        x0r, x0i, x1r, x1i, x2r, x2i, zr, zi = _step_input(
            states_ptr, u_ptr, t, row0, B, w0r, w0i, w1r, w1i, w2r, w2i,
            N, P0, P1, P2, Q0, Q1, Q2, SP0, SP1, SP2, SQ0, SQ1, SQ2, BB, HAS0, HAS1,
            DOT0, DOT1, DOT2, COMPLEX,
        )  # fmt: skip
        dr, di = _load2(grad_ptr + step, off_p, mask_p, COMPLEX)
        dr = dr + ghr
        if COMPLEX:
            di = di + ghi
        gzr, gzi, gb = _activation_backward(zr, zi, dr, di, b, ACT, COMPLEX, HAS_BIAS, EPS)
        if HAS_BIAS:
            gbias = gbias + gb
        _store2(grad_u_ptr + step, off_p, mask_p, gzr, gzi, COMPLEX)
        # Factor 2 (last axis): x2 (BB, SP0, SP1, SQ2) -> z (BB, SP0, SP1, SP2).
        gr, gi, g2r, g2i = _factor_backward(gzr, gzi, x2r, x2i, a2r, a2i, g2r, g2i, 3, BB,
                                            SP0, SP1, SP2, SP0, SP1, SQ2, SQ2, DOT2, COMPLEX,
                                            NEED_W)  # fmt: skip
        if HAS1:
            # Factor 1: x1 (BB, SP0, SQ1, SQ2) -> x2 (BB, SP0, SP1, SQ2).
            gr, gi, g1r, g1i = _factor_backward(gr, gi, x1r, x1i, a1r, a1i, g1r, g1i, 2, BB,
                                                SP0, SP1, SQ2, SP0, SQ1, SQ2, SQ1, DOT1,
                                                COMPLEX, NEED_W)  # fmt: skip
        if HAS0:
            # Factor 0: x0 (BB, SQ0, SQ1, SQ2) -> x1 (BB, SP0, SQ1, SQ2).
            gr, gi, g0r, g0i = _factor_backward(gr, gi, x0r, x0i, a0r, a0i, g0r, g0i, 1, BB,
                                                SP0, SQ1, SQ2, SQ0, SQ1, SQ2, SQ0, DOT0,
                                                COMPLEX, NEED_W)  # fmt: skip
        # gr, gi: dL/dh_{t-1} by Q digits; the next step adds it by P digits.
        if SQUARE:
            ghr = gr
            ghi = gi
        else:
            _store2(grad_h0_ptr, off_q, mask_q, gr, gi, COMPLEX)
            tl.debug_barrier()
            ghr, ghi = _load2(grad_h0_ptr, off_p, mask_p, COMPLEX)
            tl.debug_barrier()
    _store2(grad_h0_ptr, off_p, mask_p, ghr, ghi, COMPLEX)
    if NEED_W:
        if HAS0:
            _store_tile(gw0_ptr, pid, g0r, g0i, SP0, SQ0, COMPLEX)
        if HAS1:
            _store_tile(gw1_ptr, pid, g1r, g1i, SP1, SQ1, COMPLEX)
        _store_tile(gw2_ptr, pid, g2r, g2i, SP2, SQ2, COMPLEX)
    if HAS_BIAS:
        tl.store(gbias_ptr + pid * N + boff, tl.sum(gbias, axis=0), mask=bmask)


@triton.jit
def _store_tile(ptr, pid, xr, xi, SP: tl.constexpr, SQ: tl.constexpr, COMPLEX: tl.constexpr):
    C: tl.constexpr = 2 if COMPLEX else 1
    p = tl.arange(0, SP)[:, None]
    q = tl.arange(0, SQ)[None, :]
    off = (pid * (SP * SQ) + p * SQ + q) * C
    tl.store(ptr + off, xr)
    if COMPLEX:
        tl.store(ptr + off + 1, xi)


# --------------------------------------------------------------------------- planning


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclass(frozen=True)
class TileConfig:
    """How the kernels run one call: the factor slots, padding, tile and matmul kind.

    Attributes:
        shapes: ``(P_k, Q_k)`` of the three slots (a missing leading slot is ``(1, 1)``).
        present: whether each slot holds a factor.
        padded: the padded ``(SP_k, SQ_k)`` of each slot.
        rows: the batch tile ``BB``.
        dot: whether each slot's matmuls use ``tl.dot``.
        square: every factor square (the state stays in registers across steps).
        num_warps: warps per program on CUDA.
    """

    shapes: tuple[tuple[int, int], ...]
    present: tuple[bool, ...]
    padded: tuple[tuple[int, int], ...]
    rows: int
    dot: tuple[bool, ...]
    square: bool
    num_warps: int

    def constexprs(self) -> dict[str, Any]:
        (p0, q0), (p1, q1), (p2, q2) = self.shapes
        (sp0, sq0), (sp1, sq1), (sp2, sq2) = self.padded
        return {
            "N": math.prod(p for p, _ in self.shapes),
            **{"P0": p0, "P1": p1, "P2": p2, "Q0": q0, "Q1": q1, "Q2": q2},
            **{"SP0": sp0, "SP1": sp1, "SP2": sp2, "SQ0": sq0, "SQ1": sq1, "SQ2": sq2},
            "BB": self.rows,
            "HAS0": self.present[0],
            "HAS1": self.present[1],
            **{f"DOT{k}": self.dot[k] for k in range(SLOTS)},
            "SQUARE": self.square,
            "EPS": MODRELU_EPS,
        }


def _block_sizes(padded: Sequence[tuple[int, int]]) -> list[int]:
    """Elements of the state block before and after each factor (Q digits to P digits)."""
    sides = [q for _, q in padded]
    sizes = [math.prod(sides)]
    for k, (sp, _) in enumerate(padded):
        sides[k] = sp
        sizes.append(math.prod(sides))
    return sizes


def _sm_count(device: torch.device) -> int:
    try:
        return torch.cuda.get_device_properties(device).multi_processor_count
    except Exception:  # pragma: no cover - no CUDA
        return 1


def tile_config(
    shapes: Sequence[tuple[int, int]],
    dtype: torch.dtype,
    batch: int,
    device: torch.device | str = "cpu",
) -> TileConfig | None:
    """The kernels' configuration for these (at most :data:`SLOTS`) factor shapes, or ``None``
    when they do not fit one program's register budget (:data:`MAX_STATE`,
    :data:`MAX_BROADCAST`, :data:`MAX_DOT_SIDE`)."""
    if not 1 <= len(shapes) <= SLOTS:
        return None
    device = torch.device(device)
    slots = [(1, 1)] * (SLOTS - len(shapes)) + [tuple(s) for s in shapes]
    present = tuple([False] * (SLOTS - len(shapes)) + [True] * len(shapes))
    padded = [(_pow2(p), _pow2(q)) for p, q in slots]
    block = max(_block_sizes(padded))
    real = dtype.to_real() if dtype.is_complex else dtype

    def fits(rows: int) -> tuple[bool, ...] | None:
        if rows * block > MAX_STATE:
            return None
        dots = []
        for k, (sp, sq) in enumerate(padded):
            # rows of the 2-d view: the block without the factor's own axis.
            m = rows * block // max(sp, sq)
            dot = real == torch.float32 and sp >= 16 and sq >= 16 and m >= 16
            if not present[k]:
                dot = False
            elif dot:
                if max(sp, sq) > MAX_DOT_SIDE:
                    return None
            elif rows * block * max(sp, sq) > MAX_BROADCAST:
                return None
            dots.append(dot)
        return tuple(dots)

    # 32-bit registers per state element (split complex, float64 pairs).
    words = (2 if dtype.is_complex else 1) * (2 if real == torch.float64 else 1)
    rows = min(MAX_TILE_ROWS, _pow2(max(1, batch)))
    if device.type == "cuda":
        # Small tiles spread the batch over the SMs (rows never interact), and at most
        # _CUDA_TILE_WORDS registers of state per tile (ptxas: no spills up to there at N=512).
        want = max(1, batch // _sm_count(device))
        want = min(want, max(1, _CUDA_TILE_WORDS // (block * words)))
        rows = min(rows, 1 << (want.bit_length() - 1))
    while rows >= 1:
        dots = fits(rows)
        if dots is not None:
            break
        rows //= 2
    else:
        return None
    square = all(p == q for p, q in slots)
    tile_words = rows * block * words
    num_warps = 4 if tile_words < 512 else 8 if tile_words <= 1024 else 16
    return TileConfig(tuple(slots), present, tuple(padded), rows, dots, square, num_warps)  # type: ignore[arg-type]


def _groups(shapes: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """At most :data:`SLOTS` consecutive groups of the factors (the given ones if few enough)."""
    if len(shapes) <= SLOTS:
        return (1,) * len(shapes)
    return default_merge(shapes)


def triton_plan(
    shapes: Sequence[tuple[int, int]], batch_size: int, device: torch.device
) -> KronPlan | None:
    """The plan the kernel runs: :func:`~kru_core.kron.default_merge`'s grouping (two or three
    effective factors of 8-32 per side: ``tl.dot`` sized, and no dense ``W``), or ``None``
    where that grouping has more than :data:`SLOTS` factors."""
    groups = default_merge(shapes)
    if len(groups) > SLOTS:
        return None
    return KronPlan("merged", tuple(groups))


def _merge(mats: Sequence[Tensor]) -> list[Tensor]:
    groups = _groups([tuple(m.shape) for m in mats])
    if len(groups) == len(mats):
        return list(mats)
    out, start = [], 0
    for size in groups:
        out.append(kron_matrix(list(mats[start : start + size])))
        start += size
    return out


def _call_config(u: Tensor, mats: Sequence[Tensor]) -> TileConfig | None:
    shapes = [tuple(m.shape) for m in mats]
    groups = _groups(shapes)
    merged, start = [], 0
    for size in groups:
        group = shapes[start : start + size]
        merged.append((math.prod(p for p, _ in group), math.prod(q for _, q in group)))
        start += size
    if u.shape[0] == 0 or u.shape[1] == 0:
        return None
    return tile_config(merged, u.dtype, u.shape[1], u.device)


# --------------------------------------------------------------------------- autograd


def _real_view(x: Tensor) -> Tensor:
    x = x.resolve_conj().contiguous()
    return torch.view_as_real(x) if x.is_complex() else x


def _launch_options(cfg: TileConfig, device: torch.device) -> dict[str, Any]:
    return {} if device.type != "cuda" else {"num_warps": cfg.num_warps, "num_stages": 1}


class _TritonRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, cfg: TileConfig, code: int, u: Tensor, h0: Tensor, bias: Tensor | None,
        *mats: Tensor,
    ) -> Tensor:  # fmt: skip
        steps, batch, n = u.shape
        states = torch.empty((steps + 1, batch, n), dtype=u.dtype, device=u.device)
        states[0] = h0
        _forward(cfg, code, u, states, bias, mats)
        ctx.cfg = cfg
        ctx.code = code
        ctx.has_bias = bias is not None
        ctx.save_for_backward(u, states, bias, *mats)
        return states[1:]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor):  # type: ignore[override]
        u, states, bias, *mats = ctx.saved_tensors
        cfg: TileConfig = ctx.cfg
        need = ctx.needs_input_grad
        need_w = any(need[5:])
        steps, batch, n = u.shape
        complex_ = u.is_complex()
        real = u.real.dtype if complex_ else u.dtype
        grid = triton.cdiv(batch, cfg.rows)
        grad_u = torch.empty_like(u)
        grad_h0 = torch.zeros((batch, n), dtype=u.dtype, device=u.device)
        c = 2 if complex_ else 1
        partials = [
            torch.zeros((grid, sp, sq, c), dtype=real, device=u.device) for sp, sq in cfg.padded
        ]
        gbias = torch.zeros((grid, n), dtype=real, device=u.device)
        w = [_real_view(m) for m in mats]
        w = [w[0]] * (SLOTS - len(w)) + w
        _backward_kernel[(grid,)](
            _real_view(grad_out), _real_view(states), _real_view(u), *w,
            bias if bias is not None else gbias,
            _real_view(grad_u), _real_view(grad_h0), *partials, gbias, batch, steps,
            **cfg.constexprs(), COMPLEX=complex_, ACT=ctx.code, HAS_BIAS=ctx.has_bias,
            NEED_W=need_w, **_launch_options(cfg, u.device),
        )  # fmt: skip
        grad_mats: list[Tensor | None] = []
        if need_w:
            present = [k for k in range(SLOTS) if cfg.present[k]]
            for k, m in zip(present, mats, strict=True):
                p, q = m.shape
                g = partials[k].sum(0)[:p, :q]
                grad_mats.append(torch.view_as_complex(g.contiguous()) if complex_ else g[..., 0])
        else:
            grad_mats = [None] * len(mats)
        return (
            None,
            None,
            grad_u if need[2] else None,
            grad_h0 if need[3] else None,
            gbias.sum(0) if (need[4] and ctx.has_bias) else None,
            *(g if n_ else None for g, n_ in zip(grad_mats, need[5:], strict=True)),
        )


def _forward(
    cfg: TileConfig,
    code: int,
    u: Tensor,
    states: Tensor,
    bias: Tensor | None,
    mats: Sequence[Tensor],
) -> None:
    steps, batch, _ = u.shape
    w = [_real_view(m) for m in mats]
    w = [w[0]] * (SLOTS - len(w)) + w
    states_r = _real_view(states)
    _forward_kernel[(triton.cdiv(batch, cfg.rows),)](
        _real_view(u), states_r, *w, bias if bias is not None else states_r,
        batch, steps, **cfg.constexprs(), COMPLEX=u.is_complex(), ACT=code,
        HAS_BIAS=bias is not None, **_launch_options(cfg, u.device),
    )  # fmt: skip


# --------------------------------------------------------------------------- CUDA graph fallback

#: Captured fallbacks, most recently used last.
_GRAPHS: OrderedDict[tuple, Callable[..., Tensor]] = OrderedDict()
#: How many captured shapes to keep (each holds its static buffers on the GPU).
GRAPH_CACHE_SIZE = 8


def graphed_eager(
    u: Tensor, h0: Tensor, mats: Sequence[Tensor], *, activation: str, bias: Tensor | None
) -> Tensor:
    """The eager recurrence (:func:`~kru_core.recurrence.eager.eager_recurrence`) on CUDA tensors,
    captured in a CUDA graph once per shape, dtype, activation and set of inputs needing
    gradients, then replayed: one graph launch instead of ~30 kernel launches per step.
    Inference uses a ``torch.cuda.CUDAGraph``; training ``torch.cuda.make_graphed_callables``
    (forward and backward graphs)."""
    inputs = [u, h0, *mats] + ([bias] if bias is not None else [])
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    key = (
        activation,
        bias is not None,
        needs_grad,
        u.device,
        tuple((tuple(t.shape), t.dtype, t.requires_grad and needs_grad) for t in inputs),
    )
    fn = _GRAPHS.get(key)
    if fn is None:
        try:
            fn = _capture(inputs, activation, bias is not None, needs_grad)
        except Exception as exc:  # a capture the graph rules refuse: the plain loop, said once
            _log_once(f"CUDA graph capture failed ({type(exc).__name__}: {exc}); running eager")

            def fn(u: Tensor, h0: Tensor, *rest: Tensor) -> Tensor:
                n_mats = len(rest) - int(bias is not None)
                b = rest[n_mats] if bias is not None else None
                return eager_recurrence(u, h0, list(rest[:n_mats]), activation=activation, bias=b)

        _GRAPHS[key] = fn
        while len(_GRAPHS) > GRAPH_CACHE_SIZE:
            _GRAPHS.popitem(last=False)
    else:
        _GRAPHS.move_to_end(key)
    return fn(*inputs)


def _capture(
    inputs: Sequence[Tensor], activation: str, has_bias: bool, needs_grad: bool
) -> Callable[..., Tensor]:
    n_mats = len(inputs) - 2 - int(has_bias)

    def run(u: Tensor, h0: Tensor, *rest: Tensor) -> Tensor:
        mats = list(rest[:n_mats])
        bias = rest[n_mats] if has_bias else None
        return eager_recurrence(u, h0, mats, activation=activation, bias=bias)

    if needs_grad:
        samples = tuple(
            t.detach().clone().requires_grad_(t.requires_grad).contiguous() for t in inputs
        )
        graphed = torch.cuda.make_graphed_callables(run, samples, allow_unused_input=True)

        def train(*args: Tensor) -> Tensor:
            # The graph's output is a static buffer that the next replay overwrites.
            return graphed(*args).clone()

        return train

    static_in = [t.detach().clone().contiguous() for t in inputs]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(2):  # warm-up outside the graph (allocator, lazy init)
            run(*static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = run(*static_in)

    def replay(*args: Tensor) -> Tensor:
        for dst, src in zip(static_in, args, strict=True):
            dst.copy_(src)
        graph.replay()
        return static_out.clone()

    return replay


# --------------------------------------------------------------------------- the backend

_LOGGED: set[str] = set()


def _log_once(message: str) -> None:
    if message not in _LOGGED:
        _LOGGED.add(message)
        logger.warning(message)


def _available() -> str | None:
    if _INTERPRET:
        return None
    if not torch.cuda.is_available():
        return (
            "no CUDA device (set TRITON_INTERPRET=1 to run the kernel on CPU tensors in "
            "Triton's interpreter)"
        )
    if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
        return "Triton needs a C compiler (gcc, clang or $CC) to build its CUDA launcher"
    return None


def triton_supports(u: Tensor, h0: Tensor, mats: Sequence[Tensor], activation: str) -> bool:
    """Float32/64 and complex64/128 with 2-d factors, modReLU, split ReLU, identity, or tanh on
    real states; CUDA tensors (an uncovered shape runs :func:`graphed_eager`), or CPU tensors
    under ``TRITON_INTERPRET=1`` when :func:`tile_config` covers the shape."""
    if (
        u.dtype not in _DTYPES
        or h0.dtype != u.dtype
        or activation not in _ACTIVATION_CODES
        or (activation == "tanh" and u.is_complex())
        or u.dim() != 3
        or not mats
        or any(m.dim() != 2 or m.dtype != u.dtype or m.device != u.device for m in mats)
    ):
        return False
    if u.device.type == "cuda":
        return not _INTERPRET or _call_config(u, mats) is not None
    return u.device.type == "cpu" and _INTERPRET and _call_config(u, mats) is not None


def triton_recurrence(
    u: Tensor, h0: Tensor, mats: Sequence[Tensor], *, activation: str, bias: Tensor | None
) -> Tensor:
    """All states ``(T, B, N)`` by the persistent kernels (differentiable; see the module)."""
    if bias is not None and activation != "modrelu":
        bias = None
    cfg = _call_config(u, mats)
    if cfg is None:
        reason = (
            f"the triton kernel does not cover factors {[tuple(m.shape) for m in mats]} "
            f"({u.dtype}, batch {u.shape[1]})"
        )
        if u.device.type == "cuda":
            _log_once(f"{reason}; running the eager loop captured in a CUDA graph")
            return graphed_eager(u, h0, mats, activation=activation, bias=bias)
        _log_once(f"{reason}; running the eager loop")
        return eager_recurrence(u, h0, mats, activation=activation, bias=bias)
    merged = _merge(mats)
    code = _ACTIVATION_CODES[activation]
    u, h0, merged, bias = kernel_operands(u, h0, merged, bias)
    if not needs_grad(u, h0, merged, bias):
        steps, batch, n = u.shape
        states = torch.empty((steps + 1, batch, n), dtype=u.dtype, device=u.device)
        states[0] = h0
        _forward(cfg, code, u, states, bias, merged)
        return states[1:]
    return _TritonRecurrence.apply(cfg, code, u, h0, bias, *merged)


register_backend(
    "triton", triton_recurrence, available=_available, supports=triton_supports, plan=triton_plan
)

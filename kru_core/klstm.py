"""KRU-LSTM: an LSTM whose four gate recurrent matrices are each Kronecker-factored (paper 5).

.. math::
    \\begin{array}{ll}
    i_t = \\sigma(W_{i} h_{t-1} + U_i x_t + b_i) &
    f_t = \\sigma(W_{f} h_{t-1} + U_f x_t + b_f) \\\\
    g_t = \\tanh(W_{g} h_{t-1} + U_g x_t + b_g) &
    o_t = \\sigma(W_{o} h_{t-1} + U_o x_t + b_o) \\\\
    c_t = f_t \\odot c_{t-1} + i_t \\odot g_t & h_t = o_t \\odot \\tanh(c_t)
    \\end{array}

with ``W_gate = W_{gate,0} ⊗ ... ⊗ W_{gate,F-1}`` (real factors, one set per gate; the paper's
counts 172 for N=45 and 250,016 for N=500 need separate factors per gate) and dense input
matrices ``U``. No unitary penalty is used with it in the paper (gating already controls the
gradient flow), so :class:`~kru_core.SequenceModel` reports a zero penalty for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .kron import KronPlan, apply_kron_factors, kron_matrix
from .kron import unitary_penalty as _unitary_penalty
from .kru import _KroneckerRecurrent, random_unitary_, resolve_dtypes, time_major_input
from .recurrence import check_backend, fallback_to_eager

__all__ = ["KLSTM"]

_GATES = 4


class KLSTM(_KroneckerRecurrent):
    """An LSTM with Kronecker-factored recurrent matrices (the paper's "KRU-LSTM").

    Gate order is PyTorch's ``(i, f, g, o)``.

    Args:
        input_size: features per step (or the vocabulary size for token ids).
        hidden_size: ``N``.
        factors: factor sizes per gate, as for :class:`~kru_core.KRU` (default
            :func:`~kru_core.factorize` ``(hidden_size)``); every gate gets its own factors.
        complex: must be ``False``: KRU-LSTM uses real factors (paper section 5).
        bias: whether the gates have a bias ``b`` (``4 * hidden_size`` reals).
        batch_first: ``(B, T, *)`` inputs and outputs if ``True``, else ``(T, B, *)``.
        strategy, merge: execution of the recurrent products, as for :class:`~kru_core.KRU`.
        backend: accepted for symmetry with :class:`~kru_core.KRU` (``"auto"``, ``"eager"``,
            ``"cpu"``, ``"triton"``): the compiled backends cover the KRU recurrence
            ``h_t = act(W h_{t-1} + u_t)``, not the LSTM cell, so every value runs the eager
            loop (``"cpu"`` or ``"triton"`` say so in one log line).
        device, dtype: factory kwargs (real dtype).

    Inputs: x, hx, lengths
        - **x**: ``(B, T, input_size)`` features or ``(B, T)`` token ids.
        - **hx**: optional ``(h_0, c_0)``, each ``(B, hidden_size)`` (default zeros).
        - **lengths**: optional ``(B,)`` valid lengths of a padded batch: the state stops
          changing after step ``lengths[b] - 1``, so ``(h_n, c_n)`` are each sequence's own.

    Outputs: outputs, (h_n, c_n)
        - **outputs**: ``(B, T, hidden_size)``, ``h_t`` for every step.
        - **h_n**, **c_n**: ``(B, hidden_size)``.

    Attributes:
        recurrent_factors: ``4 F`` real factors, gate-major: ``[W_i0, .., W_i(F-1), W_f0, ..]``.
        weight_ih: ``(4 hidden_size, input_size)``; bias: ``(4 hidden_size,)`` or ``None``.

    Example::

        >>> lstm = KLSTM(88, 45)                      # factors (3, 3, 5) per gate
        >>> lstm.num_recurrent_parameters()
        172
        >>> out, (h, c) = lstm(torch.randn(2, 7, 88))
        >>> out.shape
        torch.Size([2, 7, 45])
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        factors: Sequence[int | Sequence[int]] | None = None,
        complex: bool = False,
        bias: bool = True,
        batch_first: bool = True,
        strategy: str = "auto",
        merge: Sequence[int] | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.backend = check_backend(backend)
        if backend not in ("auto", "eager"):
            fallback_to_eager(backend, backend, "it does not cover the KRU-LSTM cell")
        self._init_sizes(input_size, hidden_size)
        if complex is not False:
            raise ValueError(
                f"complex: expected False (KRU-LSTM uses real factors, paper section 5), "
                f"got {complex!r}"
            )
        self._init_plan(factors, strategy, merge)
        self.batch_first = bool(batch_first)
        real_dtype, _ = resolve_dtypes(dtype, False)
        kw = {"device": device, "dtype": real_dtype}
        self.recurrent_factors = nn.ParameterList(
            [
                nn.Parameter(torch.empty(p, q, **kw))
                for _ in range(_GATES)
                for p, q in self.factor_shapes
            ]
        )
        self.weight_ih = nn.Parameter(torch.empty(_GATES * hidden_size, input_size, **kw))
        if bias:
            self.bias = nn.Parameter(torch.empty(_GATES * hidden_size, **kw))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Factors: random orthogonal (each gate's ``W`` orthogonal at step 0); ``weight_ih``
        and ``bias``: ``U(-k, k)`` with ``k = 1 / sqrt(hidden_size)``, as ``torch.nn.LSTM``."""
        for w in self.recurrent_factors:
            random_unitary_(w)
        k = 1.0 / math.sqrt(self.hidden_size)
        with torch.no_grad():
            self.weight_ih.uniform_(-k, k)
            if self.bias is not None:
                self.bias.uniform_(-k, k)

    def gate_factors(self, gate: int) -> list[Tensor]:
        """The factors of gate ``gate`` (0..3 for i, f, g, o)."""
        f = len(self.factor_shapes)
        return list(self.recurrent_factors)[gate * f : (gate + 1) * f]

    def recurrent_matrix(self) -> Tensor:
        """The dense ``(4 N, N)`` stack ``[W_i; W_f; W_g; W_o]`` (``nn.LSTM``'s layout)."""
        return torch.cat([kron_matrix(self.gate_factors(g)) for g in range(_GATES)])

    def unitary_penalty(self) -> Tensor:
        """``sum ||W^T W - I||_F^2`` over all gates' factors (for analysis; the paper does not
        use it with KRU-LSTM)."""
        return _unitary_penalty(list(self.recurrent_factors))

    def num_recurrent_parameters(self) -> int:
        """Real scalars in the factors: ``4 sum_f P_f Q_f``."""
        return sum(w.numel() for w in self.recurrent_factors)

    def extra_repr(self) -> str:
        shapes = tuple(p if p == q else (p, q) for p, q in self.factor_shapes)
        s = f"{self.input_size}, {self.hidden_size}, factors={shapes}, bias={self.bias is not None}"
        s += f", batch_first={self.batch_first}"
        if self.strategy != "auto" or self.merge is not None:
            s += f", strategy={self.strategy!r}, merge={self.merge}"
        return s

    def plan(self, batch_size: int, device: torch.device | None = None) -> KronPlan:
        """The :class:`~kru_core.kron.KronPlan` used for ``batch_size`` rows."""
        return self._rule_plan(batch_size, device if device is not None else self.weight_ih.device)

    def _input_projection(self, x: Tensor) -> Tensor:
        if not x.is_floating_point():
            u = self.weight_ih.mT[x]
            return u if self.bias is None else u + self.bias
        self._check_features(x)
        x = x.to(self.weight_ih.dtype)
        if self.bias is None:
            return x @ self.weight_ih.mT
        return torch.nn.functional.linear(x, self.weight_ih, self.bias)

    def forward(
        self,
        x: Tensor,
        hx: tuple[Tensor, Tensor] | None = None,
        *,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        if x.is_complex():
            raise ValueError(f"x: expected real features or token ids, got {x.dtype}")
        xt, tokens = time_major_input(x, self.batch_first)
        steps, batch = xt.shape[:2]
        n = self.hidden_size
        u = self._input_projection(xt.contiguous() if tokens else xt)  # (T, B, 4N)
        h, c = self._initial_state(hx, batch, u)
        keep = None
        if lengths is not None:
            keep = torch.arange(steps, device=u.device)[:, None] < lengths.to(u.device)[None]
            keep = keep.unsqueeze(-1)  # (T, B, 1)
        plan = self.plan(batch, u.device)
        per_gate = [plan.effective_factors(self.gate_factors(g)) for g in range(_GATES)]
        dense = plan.strategy == "dense"
        if dense:
            w_all = torch.cat([m[0] for m in per_gate])  # (4N, N): one GEMM per step
            steps_u = u.unbind(0)
        else:
            mats = [torch.stack([m[j] for m in per_gate]) for j in range(len(plan.groups))]
            steps_u = u.view(steps, batch, _GATES, n).permute(0, 2, 1, 3).contiguous().unbind(0)
        outs = []
        for t, u_t in enumerate(steps_u):
            if dense:
                i, f, g, o = torch.addmm(u_t, h, w_all.mT).chunk(_GATES, dim=1)
            else:
                i, f, g, o = (apply_kron_factors(h, mats) + u_t).unbind(0)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            if keep is not None:
                h_new = torch.where(keep[t], h_new, h)
                c_new = torch.where(keep[t], c_new, c)
            h, c = h_new, c_new
            outs.append(h)
        out = torch.stack(outs, dim=1 if self.batch_first else 0)
        return out, (h, c)

    def _initial_state(
        self, hx: tuple[Tensor, Tensor] | None, batch: int, like: Tensor
    ) -> tuple[Tensor, Tensor]:
        shape = (batch, self.hidden_size)
        if hx is None:
            zeros = torch.zeros(shape, dtype=like.dtype, device=like.device)
            return zeros, zeros
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise ValueError(f"hx: expected a tuple (h_0, c_0), got {type(hx).__name__}")
        h, c = hx
        for name, s in (("hx[0]", h), ("hx[1]", c)):
            if tuple(s.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(s.shape)}")
        return h.to(like.dtype), c.to(like.dtype)

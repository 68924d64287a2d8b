"""Kronecker Recurrent Units: the :class:`KRU` layer and the :class:`KRUCell` step.

.. math::
    h_t = \\sigma(W h_{t-1} + U x_t + b), \\qquad
    W = W_0 \\otimes W_1 \\otimes \\cdots \\otimes W_{F-1}

(paper eqs. 1 and 4). The layers choose a backend and an execution plan and call
:func:`kru_core.recurrence.run_recurrence` (``backend=``: ``"auto"``, ``"eager"``, ``"cpu"``,
``"triton"``; checkpoints do not depend on it). How the eager time loop runs
(``docs/speed.md`` section 3):

* the input term ``U x_t (+ b)`` for every step is one GEMM (or one embedding lookup for token
  inputs) before the loop;
* the factors are merged, once per forward pass, into the few effective matrices of a
  :class:`~kru_core.kron.KronPlan` (dense ``W``, merged factors or the original ones), so a step
  is one to three ``matmul`` calls plus the activation;
* with gradients enabled the loop is a single ``torch.autograd.Function`` (``fused=True``): the
  forward runs without autograd bookkeeping, writing every intermediate into preallocated
  buffers, and the backward is a hand-written BPTT loop (the activation's derivative, then the
  adjoint factors), accumulating each effective factor's gradient with one GEMM per step; the
  gradients reach the original factors through ``torch.kron``'s autograd, once per pass.
  ``docs/speed.md`` section 3, item 3; it is checked against the autograd loop and
  ``gradcheck`` in tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .activations import ACTIVATIONS, apply_activation
from .kron import (
    STRATEGIES,
    KronPlan,
    apply_kron_factors,
    kron_matrix,
    normalize_factor_shapes,
    plan_recurrence,
)
from .kron import unitary_penalty as _unitary_penalty
from .recurrence import check_backend, preferred_plan, resolve_backend, run_recurrence

__all__ = ["KRU", "KRUCell"]


def check_positive_int(name: str, value: Any) -> int:
    """Return ``value`` if it is a positive int, else raise ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def resolve_dtypes(dtype: torch.dtype | None, is_complex: bool) -> tuple[torch.dtype, torch.dtype]:
    """``(real_dtype, state_dtype)`` from a factory ``dtype`` (real or complex) and ``complex``."""
    if dtype is None:
        real = torch.get_default_dtype()
    elif not isinstance(dtype, torch.dtype) or not (dtype.is_floating_point or dtype.is_complex):
        raise ValueError(f"dtype: expected a floating or complex torch.dtype, got {dtype!r}")
    elif dtype.is_complex:
        if not is_complex:
            raise ValueError(f"dtype: expected a real dtype with complex=False, got {dtype}")
        real = dtype.to_real()
    else:
        real = dtype
    return real, (real.to_complex() if is_complex else real)


def random_unitary_(w: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Fill ``w`` (``P×Q``) with a random unitary (orthogonal if real) matrix, in place.

    QR of a Gaussian matrix with the phases of ``R``'s diagonal absorbed into ``Q`` (Haar
    distributed). A rectangular factor gets orthonormal columns (``P > Q``) or rows (``P < Q``).
    ``generator`` draws the Gaussian (torch's global one by default).
    """
    p, q = w.shape
    tall = p >= q
    g = torch.randn((p, q) if tall else (q, p), dtype=w.dtype, device=w.device, generator=generator)
    qmat, r = torch.linalg.qr(g)
    d = torch.diagonal(r)
    phase = d / d.abs().clamp_min(torch.finfo(d.abs().dtype).tiny)
    qmat = qmat * phase.unsqueeze(0)
    with torch.no_grad():
        w.copy_(qmat if tall else qmat.mH)
    return w


class _KroneckerRecurrent(nn.Module):
    """The arguments and input checks that :class:`KRU`, :class:`KRUCell` and
    :class:`~kru_core.klstm.KLSTM` share: sizes, factor shapes and execution plan."""

    def _init_sizes(self, input_size: int, hidden_size: int) -> None:
        self.input_size = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)

    def _init_plan(
        self,
        factors: Sequence[int | Sequence[int]] | None,
        strategy: str,
        merge: Sequence[int] | None,
    ) -> None:
        """Set ``factor_shapes``, ``strategy`` and ``merge`` (after :meth:`_init_sizes`)."""
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
        self.factor_shapes = normalize_factor_shapes(factors, self.hidden_size)
        # Validates ``merge`` against the factors now rather than at the first forward.
        plan_recurrence(self.factor_shapes, batch_size=1, strategy=strategy, merge=merge)
        self.strategy = strategy
        self.merge = None if merge is None else tuple(merge)

    def _rule_plan(self, batch_size: int, device: torch.device | str) -> KronPlan:
        """:func:`~kru_core.kron.plan_recurrence`'s plan for ``strategy`` and ``merge``."""
        return plan_recurrence(
            self.factor_shapes,
            batch_size=batch_size,
            device=device,
            strategy=self.strategy,
            merge=self.merge,
        )

    def _check_features(self, x: Tensor) -> None:
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"x: expected last dimension input_size={self.input_size}, got shape "
                f"{tuple(x.shape)}"
            )


def time_major_input(x: Tensor, batch_first: bool) -> tuple[Tensor, bool]:
    """A layer's ``x`` (``(B, T, input_size)`` features or ``(B, T)`` token ids, time first
    unless ``batch_first``) checked and time first, and whether it holds token ids."""
    tokens = not (x.is_floating_point() or x.is_complex())
    if x.dim() != (2 if tokens else 3):
        want = "(B, T) token ids" if tokens else "(B, T, input_size) features"
        raise ValueError(f"x: expected {want}, got shape {tuple(x.shape)}")
    time_major = x.transpose(0, 1) if batch_first else x
    if time_major.shape[0] == 0:
        raise ValueError("x: expected at least one time step, got 0")
    return time_major, tokens


class _KRUBase(_KroneckerRecurrent):
    """Parameters and everything but the loop, shared by :class:`KRU` and :class:`KRUCell`;
    its constructor is :class:`KRUCell`'s (:class:`KRU` adds ``batch_first`` and ``fused``)."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        factors: Sequence[int | Sequence[int]] | None = None,
        complex: bool = True,
        activation: str = "modrelu",
        bias: bool = True,
        strategy: str = "auto",
        merge: Sequence[int] | None = None,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.backend = check_backend(backend)
        self._init_sizes(input_size, hidden_size)
        if not isinstance(complex, bool):
            raise ValueError(f"complex: expected a bool, got {complex!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
        if activation == "tanh" and complex:
            raise ValueError(
                "activation: expected 'modrelu', 'split_relu' or 'identity' with complex=True "
                "(tanh is for real states), got 'tanh'"
            )
        self._init_plan(factors, strategy, merge)
        self.complex = complex
        self.activation = activation
        self.fused = True
        real_dtype, state_dtype = resolve_dtypes(dtype, complex)
        kw = {"device": device, "dtype": state_dtype}
        self.recurrent_factors = nn.ParameterList(
            [nn.Parameter(torch.empty(p, q, **kw)) for p, q in self.factor_shapes]
        )
        self.weight_ih = nn.Parameter(torch.empty(hidden_size, input_size, **kw))
        if not bias:
            self.register_parameter("bias", None)
        elif activation == "modrelu":
            self.bias = nn.Parameter(torch.empty(hidden_size, device=device, dtype=real_dtype))
        else:
            self.bias = nn.Parameter(torch.empty(hidden_size, **kw))
        self._cache: tuple[tuple, list[Tensor]] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the parameters (paper section 4 leaves this open; these are our choices).

        * every Kronecker factor: a random unitary matrix (orthogonal if real; orthonormal
          columns or rows if rectangular), so ``W`` is exactly unitary and
          :meth:`unitary_penalty` is 0 at step 0;
        * ``weight_ih`` (``U``): Glorot uniform (for complex ``U`` the real and imaginary parts
          each ``U(-a, a)`` with ``a = sqrt(3 / (input_size + hidden_size))``, so
          ``E|U_ij|^2 = 2 / (input_size + hidden_size)``);
        * modReLU bias: ``U(-0.01, 0)`` (non-positive, avoiding the blow-up of modReLU's
          gradient near 0, ``docs/speed.md`` pitfall 5); an additive bias: zeros.
        """
        for w in self.recurrent_factors:
            random_unitary_(w)
        fan = self.input_size + self.hidden_size
        with torch.no_grad():
            if self.complex:
                a = math.sqrt(3.0 / fan)
                torch.view_as_real(self.weight_ih).uniform_(-a, a)
            else:
                nn.init.xavier_uniform_(self.weight_ih)
            if self.bias is not None:
                if self.activation == "modrelu":
                    self.bias.uniform_(-0.01, 0.0)
                else:
                    self.bias.zero_()
        self._cache = None

    # ------------------------------------------------------------------ analysis API
    def recurrent_matrix(self) -> Tensor:
        """The dense ``W = kron(W_0, ..., W_{F-1})`` (``N×N``), differentiable; for tests and
        analysis (the forward pass does not need it unless the plan is ``"dense"``)."""
        return kron_matrix(list(self.recurrent_factors))

    def unitary_penalty(self) -> Tensor:
        """``sum_f ||W_f^H W_f - I||_F^2`` over the original factors (paper eq. 7), 0-dim."""
        return _unitary_penalty(list(self.recurrent_factors))

    def num_recurrent_parameters(self) -> int:
        """Real scalars in the factors: ``c * sum_f P_f Q_f`` with ``c = 2`` if complex."""
        return sum(w.numel() * (2 if w.is_complex() else 1) for w in self.recurrent_factors)

    def extra_repr(self) -> str:
        shapes = tuple(p if p == q else (p, q) for p, q in self.factor_shapes)
        s = (
            f"{self.input_size}, {self.hidden_size}, factors={shapes}, complex={self.complex}, "
            f"activation={self.activation!r}, bias={self.bias is not None}"
        )
        if hasattr(self, "batch_first"):
            s += f", batch_first={self.batch_first}"
        if self.strategy != "auto" or self.merge is not None:
            s += f", strategy={self.strategy!r}"
        if self.merge is not None:
            s += f", merge={self.merge}"
        return s

    # ------------------------------------------------------------------ dtype and device
    @property
    def state_dtype(self) -> torch.dtype:
        """The dtype of the state and of every step's arithmetic: the factors' dtype (it follows
        ``.double()``, ``.to(...)``; fixed at construction it broke ``.double()``)."""
        return self.recurrent_factors[0].dtype

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        # ``Module.double()`` / ``.float()`` / ``.to(float64)`` convert floating tensors only
        # (``.to`` would even drop the imaginary part of complex ones), which leaves a complex
        # KRU with complex64 factors next to a float64 bias. Complex tensors here follow the
        # precision that real tensors get; half precision has no usable complex dtype (no
        # complex32 matmul), so complex tensors then keep theirs.
        def convert(t: Tensor) -> Tensor:
            if not t.is_complex():
                return fn(t)
            probe = fn(torch.empty(0, dtype=t.real.dtype, device=t.device))
            if probe.dtype == t.real.dtype:
                return fn(t)
            keep = probe.dtype not in (torch.float32, torch.float64)
            return t.to(device=probe.device, dtype=t.dtype if keep else probe.dtype.to_complex())

        self._cache = None
        return super()._apply(convert, recurse)

    # ------------------------------------------------------------------ execution
    def resolved_backend(self, device: torch.device | str | None = None) -> str:
        """The backend a forward pass on ``device`` runs (``backend`` with ``"auto"`` and
        fallbacks resolved, :func:`~kru_core.recurrence.resolve_backend`); ``"eager"`` when
        ``fused=False`` (the reference loop)."""
        dev = device if device is not None else self.recurrent_factors[0].device
        if not self.fused:
            return "eager"
        return resolve_backend(self.backend, dev)

    def plan(
        self, batch_size: int, device: torch.device | None = None, *, backend: str | None = None
    ) -> KronPlan:
        """The :class:`~kru_core.kron.KronPlan` a forward pass over ``batch_size`` rows uses
        (with ``strategy="auto"``, the concrete ``backend``'s preferred plan if it has one)."""
        dev = device if device is not None else self.recurrent_factors[0].device
        if backend is not None and self.strategy == "auto" and self.merge is None:
            preferred = preferred_plan(backend, self.factor_shapes, batch_size, dev)
            if preferred is not None:
                return preferred
        return self._rule_plan(batch_size, dev)

    def effective_factors(self, plan: KronPlan) -> list[Tensor]:
        """The plan's matrices (built from the factors; cached while gradients are off)."""
        factors = list(self.recurrent_factors)
        if torch.is_grad_enabled():
            return plan.effective_factors(factors)
        key = (plan, tuple((w.data_ptr(), w._version, w.device, w.dtype) for w in factors))
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, plan.effective_factors(factors))
        return self._cache[1]

    def input_projection(self, x: Tensor) -> Tensor:
        """``U x (+ b)`` for features ``(*, input_size)`` or token ids ``(*)`` (an embedding
        lookup of ``U``'s columns, no one-hot); returns ``(*, hidden_size)`` in the state dtype.

        The additive bias (activations other than modReLU) is included; modReLU's bias is not.
        """
        additive = self.bias if self.activation != "modrelu" else None
        if not (x.is_floating_point() or x.is_complex()):
            if x.dtype == torch.bool:
                raise ValueError("x: expected float features or integer token ids, got bool")
            u = self.weight_ih.mT[x]
            return u if additive is None else u + additive
        self._check_features(x)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.input_size)
        n = self.hidden_size
        if self.complex and not x.is_complex():
            # Real inputs times complex U as one real GEMM on U's (re, im) pairs (exact).
            x2 = x2.to(self.weight_ih.real.dtype)
            w2 = torch.view_as_real(self.weight_ih).permute(1, 0, 2).reshape(self.input_size, 2 * n)
            if additive is not None:
                y = torch.addmm(torch.view_as_real(additive).reshape(2 * n), x2, w2)
            else:
                y = x2 @ w2
            u = torch.view_as_complex(y.view(-1, n, 2))
        else:
            x2 = x2.to(self.state_dtype)
            if additive is not None:
                u = torch.addmm(additive, x2, self.weight_ih.mT)
            else:
                u = x2 @ self.weight_ih.mT
        return u.reshape(*lead, n)

    def _initial_state(self, hx: Tensor | None, batch: int, like: Tensor, name: str) -> Tensor:
        if hx is None:
            return torch.zeros(batch, self.hidden_size, dtype=self.state_dtype, device=like.device)
        if hx.shape != (batch, self.hidden_size):
            raise ValueError(
                f"{name}: expected shape ({batch}, {self.hidden_size}), got {tuple(hx.shape)}"
            )
        if hx.is_complex() and not self.complex:
            raise ValueError(f"{name}: expected a real state with complex=False, got {hx.dtype}")
        return hx.to(self.state_dtype)

    def _modrelu_bias(self) -> Tensor | None:
        # modReLU's bias acts as min(b, 0): with b <= 0 modReLU is 1-Lipschitz (|dh/dz| <= 1),
        # so with a unitary W the backward pass cannot grow. A positive b makes modReLU
        # discontinuous at z = 0 with a gain of b / eps there (``docs/results.md`` section 1):
        # pixel MNIST overflowed within 4 steps that way. :meth:`constrain_` keeps the stored
        # value in range, so the clamp is the identity for models trained here.
        if self.activation != "modrelu" or self.bias is None:
            return None
        return self.bias.clamp(max=0.0).to(self.state_dtype.to_real())

    @torch.no_grad()
    def constrain_(self) -> None:
        """Project the parameters back into their domain after an optimizer step: modReLU's
        bias to ``b <= 0`` (projected gradient descent; a no-op for the other activations)."""
        if self.activation == "modrelu" and self.bias is not None:
            self.bias.clamp_(max=0.0)


class KRU(_KRUBase):
    """A Kronecker Recurrent Unit layer (Jose, Cissé and Fleuret, ICML 2018).

    .. math::
        h_t = \\sigma(W h_{t-1} + U x_t + b), \\qquad
        W = W_0 \\otimes W_1 \\otimes \\cdots \\otimes W_{F-1}

    where ``W_f`` are the (complex by default) Kronecker factors, ``U`` is ``weight_ih`` and
    ``sigma`` is ``activation``. For modReLU, ``bias`` is modReLU's real bias per unit (the uRNN
    layout: ``sigma(z) = relu(|z| + b) z / |z|`` with no additive bias). It acts as
    ``min(b, 0)``, and :meth:`constrain_` (called by the training engine after every update)
    keeps it there: with ``b <= 0`` modReLU is 1-Lipschitz, so with a unitary ``W`` the gradient
    cannot grow through time. For the other activations ``bias`` is an additive bias ``b`` in
    the state dtype.

    Args:
        input_size: features per step (or the vocabulary size when ``x`` holds token ids).
        hidden_size: ``N``, the state size.
        factors: the factor sizes, a list of ints (square) or ``(P, Q)`` pairs with
            ``prod P == prod Q == hidden_size``. Default: :func:`~kru_core.kron.factorize`
            ``(hidden_size)`` (2×2 factors for powers of two).
        complex: complex factors, input map and state (``True``, as in the paper) or real.
        activation: ``"modrelu"``, ``"split_relu"``, ``"tanh"`` (real only) or ``"identity"``.
        bias: whether the layer has ``bias`` (see above).
        batch_first: ``x`` and outputs are ``(B, T, *)`` if ``True``, else ``(T, B, *)``.
        strategy: how the recurrence is executed: ``"auto"`` (the rule of
            :func:`~kru_core.kron.plan_recurrence`), ``"dense"``, ``"merged"`` or ``"factored"``.
            The result is the same up to rounding; parameters, counts and penalty are unaffected.
        merge: group sizes for ``"merged"``, e.g. ``(3, 3, 3)`` for nine factors into 8×8×8.
        fused: run the time loop as one autograd Function with a hand-written backward
            (faster); ``False`` records every step with autograd (the reference path, always
            the ``"eager"`` backend).
        backend: which implementation runs the time loop (:mod:`kru_core.recurrence`):
            ``"auto"`` (the fastest measured one for the device: the compiled ``"cpu"``
            operator on the CPU, ``"triton"`` on CUDA, each where available), ``"eager"``
            (PyTorch ops, the reference), ``"cpu"`` or ``"triton"``. An unavailable backend
            falls back to ``"eager"`` with one log line. Results agree up to rounding and
            checkpoints do not depend on it.
        device, dtype: factory kwargs; ``dtype`` is the real dtype (or the complex one).

    Inputs: x, h0
        - **x**: ``(B, T, input_size)`` float features (``(T, B, ...)`` if not
          ``batch_first``), or ``(B, T)`` integer token ids below ``input_size``.
        - **h0**: ``(B, hidden_size)`` initial state (default zeros).

    Outputs: outputs, h_n
        - **outputs**: ``(B, T, hidden_size)`` with ``h_t`` for every step, complex if
          ``complex=True`` (may be a non-contiguous view).
        - **h_n**: ``(B, hidden_size)``, the last state.

    Attributes:
        recurrent_factors: the factors ``W_f`` (``nn.ParameterList``, shapes ``(P_f, Q_f)``).
        weight_ih: ``U``, ``(hidden_size, input_size)``.
        bias: modReLU's ``(hidden_size,)`` real bias, or the additive bias, or ``None``.

    Example::

        >>> kru = KRU(1, 512)                      # nine complex 2x2 factors
        >>> kru.num_recurrent_parameters()
        72
        >>> out, h_n = kru(torch.randn(4, 10, 1))
        >>> out.shape, out.dtype
        (torch.Size([4, 10, 512]), torch.complex64)
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        *,
        factors: Sequence[int | Sequence[int]] | None = None,
        complex: bool = True,
        activation: str = "modrelu",
        bias: bool = True,
        batch_first: bool = True,
        strategy: str = "auto",
        merge: Sequence[int] | None = None,
        fused: bool = True,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            input_size,
            hidden_size,
            factors=factors,
            complex=complex,
            activation=activation,
            bias=bias,
            strategy=strategy,
            merge=merge,
            backend=backend,
            device=device,
            dtype=dtype,
        )
        self.batch_first = bool(batch_first)
        self.fused = bool(fused)

    def forward(self, x: Tensor, h0: Tensor | None = None) -> tuple[Tensor, Tensor]:
        time_major, tokens = time_major_input(x, self.batch_first)
        batch = time_major.shape[1]
        u = self.input_projection(time_major.contiguous() if tokens else time_major)
        h = self._initial_state(h0, batch, u, "h0")
        backend = self.resolved_backend(u.device)
        out = run_recurrence(
            u,
            h,
            self.effective_factors(self.plan(batch, u.device, backend=backend)),
            activation=self.activation,
            bias=self._modrelu_bias(),
            backend=backend,
            fused=self.fused,
        )
        return (out.transpose(0, 1) if self.batch_first else out), out[-1]


class KRUCell(_KRUBase):
    """One step of :class:`KRU`, for streaming inference: ``h' = sigma(W h + U x + b)``.

    The parameters are those of :class:`KRU` with the same names, so a cell can load a layer's
    ``state_dict`` (or use :meth:`from_layer` to share its parameters); stepping the cell over a
    sequence equals the layer's forward. While gradients are off, the plan's matrices are cached
    between calls and rebuilt when a factor changes.

    Args:
        input_size, hidden_size, factors, complex, activation, bias, strategy, merge, backend,
        device, dtype: as for :class:`KRU`.

    Inputs: x, hx
        - **x**: ``(B, input_size)`` features or ``(B,)`` token ids.
        - **hx**: ``(B, hidden_size)`` state (default zeros).

    Outputs: h'
        - **h'**: ``(B, hidden_size)``, the next state.

    Example::

        >>> layer = KRU(3, 16)
        >>> cell = KRUCell.from_layer(layer)
        >>> x = torch.randn(2, 5, 3)
        >>> h = None
        >>> for t in range(5):
        ...     h = cell(x[:, t], h)
        >>> torch.allclose(h, layer(x)[1], atol=1e-5)
        True
    """

    @classmethod
    def from_layer(cls, layer: KRU) -> KRUCell:
        """A cell that shares ``layer``'s parameters (the same ``nn.Parameter`` objects)."""
        cell = cls(
            layer.input_size,
            layer.hidden_size,
            factors=layer.factor_shapes,
            complex=layer.complex,
            activation=layer.activation,
            bias=layer.bias is not None,
            strategy=layer.strategy,
            merge=layer.merge,
            backend=layer.backend,
            device=layer.weight_ih.device,
            dtype=layer.state_dtype,
        )
        cell.recurrent_factors = layer.recurrent_factors
        cell.weight_ih = layer.weight_ih
        cell.bias = layer.bias
        return cell

    def forward(self, x: Tensor, hx: Tensor | None = None) -> Tensor:
        tokens = not (x.is_floating_point() or x.is_complex())
        if x.dim() != (1 if tokens else 2):
            want = "(B,) token ids" if tokens else "(B, input_size) features"
            raise ValueError(f"x: expected {want}, got shape {tuple(x.shape)}")
        u = self.input_projection(x)
        h = self._initial_state(hx, x.shape[0], u, "hx")
        backend = self.resolved_backend(u.device)
        mats = self.effective_factors(self.plan(x.shape[0], u.device, backend=backend))
        if backend == "eager":
            z = apply_kron_factors(h, mats, add=u)
            return apply_activation(self.activation, z, self._modrelu_bias())
        bias = self._modrelu_bias()
        return run_recurrence(
            u[None], h, mats, activation=self.activation, bias=bias, backend=backend
        )[0]

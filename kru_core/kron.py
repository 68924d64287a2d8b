"""Kronecker-factored linear maps: products, penalties, factor sizes and execution plans.

A Kronecker recurrent matrix ``W = W_0 ⊗ W_1 ⊗ ... ⊗ W_{F-1}`` (paper eq. 4) is never
materialised by :func:`kron_matvec`: the state is viewed as a tensor with one axis per factor and
each factor is applied to its axis by a ``matmul`` on a reshaped view (paper section 3.1).

For a recurrence, applying nine tiny 2×2 factors per time step is dominated by per-op overhead
(``docs/speed.md`` section 1). A :class:`KronPlan` therefore decides, once per forward pass, how the
factors are *executed*:

* ``"dense"``: ``W = torch.kron(W_0, ..., W_{F-1})`` is built once and each step is one GEMM;
* ``"merged"``: consecutive factors are merged with ``torch.kron`` into a few larger effective
  factors (e.g. nine 2×2 factors into 16×32), each applied by one ``matmul`` per step;
* ``"factored"``: the original factors, one ``matmul`` each (the reference path).

Autograd carries gradients from the effective factors back to the original ones, so parameters,
parameter counts and the unitary penalty always live on the original factors.
:func:`plan_recurrence` picks the strategy with the rule documented there.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "STRATEGIES",
    "KronPlan",
    "apply_kron_factors",
    "default_merge",
    "factorize",
    "kron_matrix",
    "kron_matvec",
    "normalize_factor_shapes",
    "plan_recurrence",
    "unitary_penalty",
]

#: Execution strategies accepted by :func:`plan_recurrence` (``"auto"`` resolves to one of the
#: other three).
STRATEGIES = ("auto", "dense", "merged", "factored")

# Effective factors produced by the default merge are at most about this size per side: measured
# on 2 CPU cores (docs/speed.md section 1 and docs/benchmarks.md), 8-32 is the sweet spot between
# per-op overhead (many tiny factors) and wasted flops (one dense N×N matrix).
_MERGE_TARGET_LOG2 = 5.0


def factorize(n: int, num_factors: int | None = None) -> tuple[int, ...]:
    """Choose Kronecker factor sizes for a hidden size ``n`` (the paper's rule, section 1.3).

    ``n`` is split into its prime factors; while more than ``num_factors`` remain, the two
    smallest are merged (which keeps the sum of squared sizes, the parameter count, small). With
    ``num_factors=None`` every prime is its own factor, so powers of two get 2×2 factors.

    Args:
        n: the size to factor (``prod`` of the result), at least 1.
        num_factors: how many factors to return; at most the number of prime factors of ``n``.
            Default: one per prime factor.

    Returns:
        The factor sizes in ascending order.

    Example::

        >>> factorize(512)
        (2, 2, 2, 2, 2, 2, 2, 2, 2)
        >>> factorize(411), factorize(993), factorize(100), factorize(45)
        ((3, 137), (3, 331), (2, 2, 5, 5), (3, 3, 5))
        >>> factorize(500, 2)
        (20, 25)
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    primes: list[int] = []
    rest, p = n, 2
    while p * p <= rest:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if rest > 1 or not primes:
        primes.append(rest)
    if num_factors is None:
        return tuple(primes)
    if isinstance(num_factors, bool) or not isinstance(num_factors, int) or num_factors < 1:
        raise ValueError(f"num_factors: expected a positive int or None, got {num_factors!r}")
    if num_factors > len(primes):
        raise ValueError(
            f"num_factors: expected at most {len(primes)} (the number of prime factors of "
            f"{n}), got {num_factors}"
        )
    heap = list(primes)
    heapq.heapify(heap)
    while len(heap) > num_factors:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        heapq.heappush(heap, a * b)
    return tuple(sorted(heap))


def normalize_factor_shapes(
    factors: Sequence[int | Sequence[int]] | None, hidden_size: int, *, name: str = "factors"
) -> tuple[tuple[int, int], ...]:
    """Turn a ``factors`` argument into ``((P_0, Q_0), ...)`` and check it against ``hidden_size``.

    ``None`` means :func:`factorize` ``(hidden_size)``; an int ``p`` means a square ``p×p`` factor.
    Raises ``ValueError`` naming ``name`` unless ``prod P_f == prod Q_f == hidden_size``.
    """
    if factors is None:
        return tuple((p, p) for p in factorize(hidden_size))
    if isinstance(factors, (str, bytes, int)) or not isinstance(factors, Sequence):
        raise ValueError(
            f"{name}: expected a list of ints or (P, Q) pairs, got {type(factors).__name__}"
        )
    if len(factors) == 0:
        raise ValueError(f"{name}: expected at least one factor, got an empty list")
    shapes: list[tuple[int, int]] = []
    for f in factors:
        pair = (f, f) if isinstance(f, int) else tuple(f) if isinstance(f, Sequence) else None
        if (
            pair is None
            or len(pair) != 2
            or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in pair)
        ):
            raise ValueError(
                f"{name}: expected positive ints or (P, Q) pairs of positive ints, got {f!r}"
            )
        shapes.append((pair[0], pair[1]))
    rows = math.prod(p for p, _ in shapes)
    cols = math.prod(q for _, q in shapes)
    if rows != hidden_size or cols != hidden_size:
        raise ValueError(
            f"{name}: expected factor sizes whose products equal hidden_size={hidden_size}, "
            f"got {list(factors)!r} (prod P = {rows}, prod Q = {cols})"
        )
    return tuple(shapes)


def _kron2(a: Tensor, b: Tensor) -> Tensor:
    if a.dim() == 2 and b.dim() == 2:
        return torch.kron(a, b)
    # Batched over leading (gate) dimensions: (..., p, q) ⊗ (..., r, s) -> (..., p r, q s).
    p, q = a.shape[-2:]
    r, s = b.shape[-2:]
    out = a[..., :, None, :, None] * b[..., None, :, None, :]
    return out.reshape(*out.shape[:-4], p * r, q * s)


def kron_matrix(factors: Sequence[Tensor]) -> Tensor:
    """The dense ``W_0 ⊗ W_1 ⊗ ... ⊗ W_{F-1}`` (``torch.kron`` order; leading dims batch)."""
    if len(factors) == 0:
        raise ValueError("factors: expected at least one factor, got an empty list")
    out = factors[0]
    for w in factors[1:]:
        out = _kron2(out, w)
    return out


def apply_kron_factors(x: Tensor, mats: Sequence[Tensor], *, add: Tensor | None = None) -> Tensor:
    """``x @ kron(mats).mT (+ add)`` by one ``matmul`` per factor on reshaped views.

    ``x`` is ``(B, prod Q)``; every ``mats[k]`` is ``(*G, P_k, Q_k)`` with the same (possibly
    empty) leading group shape ``G`` (KLSTM uses one group per gate). The result is
    ``(*G, B, prod P)``. Factor 0 acts on the most significant index (``torch.kron`` order). The
    state is never permuted: after factor k it is laid out ``(B, P_0..P_k, Q_{k+1}..)``, so factor
    k is a broadcast batched matmul over the leading rows and the last one is a single GEMM.
    """
    batch = x.shape[0]
    qs = [m.shape[-1] for m in mats]
    rows = batch
    y = x
    for k, m in enumerate(mats):
        p, q = m.shape[-2:]
        trailing = math.prod(qs[k + 1 :])
        lead = y.shape[:-2]
        if trailing == 1:
            y = y.reshape(*lead, rows, q)
            if add is not None and m.dim() == 2 and not lead:
                # Fuse the step's input term into the last GEMM (one op fewer per step).
                y = torch.addmm(add.reshape(rows, p), y, m.mT)
                add = None
            else:
                y = y @ m.mT
        else:
            y = m.unsqueeze(-3) @ y.reshape(*lead, rows, q, trailing)
            y = y.reshape(*y.shape[:-3], rows * p, trailing)
        rows *= p
    y = y.reshape(*y.shape[:-2], batch, -1)
    if add is not None:
        y = y + add
    return y


def kron_matvec(h: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """``h @ torch.kron(W_0, ..., W_{F-1}).T`` without materialising the Kronecker product.

    .. math::
        y = (W_0 \\otimes W_1 \\otimes \\cdots \\otimes W_{F-1})\\, h

    applied to every row of ``h``. Factors may be real or complex and rectangular; factor 0 acts
    on the most significant index, exactly as ``torch.kron(W_0, W_1, ...)`` orders it (paper
    section 3.1). Differentiable with respect to ``h`` and the factors.

    Args:
        h: ``(*, prod_f Q_f)`` input rows.
        factors: ``W_f`` of shape ``(P_f, Q_f)``, same dtype as ``h``.

    Shape:
        - h: :math:`(*, \\prod_f Q_f)`
        - output: :math:`(*, \\prod_f P_f)`

    Example::

        >>> ws = [torch.randn(2, 3), torch.randn(4, 2)]
        >>> h = torch.randn(5, 6)
        >>> torch.allclose(kron_matvec(h, ws), h @ torch.kron(*ws).T, atol=1e-5)
        True
    """
    if len(factors) == 0:
        raise ValueError("factors: expected at least one factor, got an empty list")
    for i, w in enumerate(factors):
        if w.dim() != 2:
            raise ValueError(
                f"factors[{i}]: expected a 2-D (P, Q) tensor, got shape {tuple(w.shape)}"
            )
    n_in = math.prod(w.shape[1] for w in factors)
    if h.dim() < 1 or h.shape[-1] != n_in:
        raise ValueError(
            f"h: expected last dimension prod Q_f = {n_in}, got shape {tuple(h.shape)}"
        )
    lead = h.shape[:-1]
    y = apply_kron_factors(h.reshape(-1, n_in), factors)
    return y.reshape(*lead, y.shape[-1])


def unitary_penalty(factors: Sequence[Tensor]) -> Tensor:
    """The soft unitary penalty ``sum_f ||W_f^H W_f - I||_F^2`` (paper eq. 7).

    For real factors ``W^H = W^T``. A rectangular ``P×Q`` factor is compared with the ``Q×Q``
    identity. The cost is ``O(sum_f P_f Q_f^2)``, negligible next to the recurrence.

    Args:
        factors: ``W_f`` of shape ``(P_f, Q_f)`` (a leading batch dimension is summed over too).

    Returns:
        A 0-dim real tensor (``0.`` for an empty list).

    Example::

        >>> q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.complex64))
        >>> float(unitary_penalty([q])) < 1e-10
        True
    """
    total: Tensor | None = None
    for w in factors:
        gram = w.mH @ w
        eye = torch.eye(w.shape[-1], dtype=w.dtype, device=w.device)
        term = (gram - eye).abs().pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total


def default_merge(shapes: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """The default grouping of consecutive factors for the ``"merged"`` strategy.

    The number of groups is ``K = ceil(log2(N) / 5)`` (effective factors of about 32 or less per
    side), capped by the number of factors; the consecutive factors are then split into ``K``
    groups as evenly as possible in ``log2`` size (minimising the largest group). Nine 2×2
    factors (N=512) give ``(4, 5)``: effective factors 16×16 and 32×32; (3, 137) stays as is.

    Returns:
        The number of original factors in each group, in order.
    """
    sizes = [math.log2(max(p, q)) for p, q in shapes]
    n_log2 = sum(sizes)
    k = max(1, min(len(shapes), math.ceil(n_log2 / _MERGE_TARGET_LOG2 - 1e-9)))
    # Minimise the largest group's log-size over contiguous partitions (F is small: DP is cheap).
    f = len(sizes)
    prefix = [0.0]
    for s in sizes:
        prefix.append(prefix[-1] + s)
    best: dict[tuple[int, int], tuple[float, tuple[int, ...]]] = {}

    def solve(start: int, groups: int) -> tuple[float, tuple[int, ...]]:
        if groups == 1:
            return prefix[f] - prefix[start], (f - start,)
        key = (start, groups)
        if key not in best:
            options = []
            for end in range(start + 1, f - groups + 2):
                rest_cost, rest = solve(end, groups - 1)
                options.append((max(prefix[end] - prefix[start], rest_cost), (end - start, *rest)))
            best[key] = min(options)
        return best[key]

    return solve(0, k)[1]


@dataclass(frozen=True)
class KronPlan:
    """How a Kronecker-factored matrix is executed in a recurrence (one forward pass).

    Attributes:
        strategy: ``"dense"``, ``"merged"`` or ``"factored"`` (resolved, never ``"auto"``).
        groups: the number of consecutive original factors merged into each effective factor
            (``(F,)`` for dense, ``(1,) * F`` for factored).
    """

    strategy: str
    groups: tuple[int, ...]

    def effective_factors(self, factors: Sequence[Tensor]) -> list[Tensor]:
        """Merge ``factors`` (differentiably, with ``torch.kron``) into this plan's matrices."""
        if sum(self.groups) != len(factors):
            raise ValueError(
                f"factors: expected {sum(self.groups)} factors for groups {self.groups}, "
                f"got {len(factors)}"
            )
        out: list[Tensor] = []
        start = 0
        for size in self.groups:
            out.append(kron_matrix(factors[start : start + size]))
            start += size
        return out


def plan_recurrence(
    shapes: Sequence[tuple[int, int]],
    *,
    batch_size: int,
    device: torch.device | str | None = None,
    strategy: str = "auto",
    merge: Sequence[int] | None = None,
) -> KronPlan:
    """Choose how to execute ``W h`` for a recurrence over a batch (see :class:`KronPlan`).

    The ``"auto"`` rule, from timings on 2 CPU cores (complex64, modReLU, fwd and fwd+bwd,
    ``docs/benchmarks.md``) and ``docs/speed.md`` section 4 for CUDA:

    * a single factor, or an explicit ``merge`` grouping: that grouping (``"merged"``);
    * CUDA: ``"dense"`` when ``N <= 2048`` (one cuBLAS GEMM per step beats several launches),
      else ``"merged"``;
    * CPU: ``"dense"`` when ``N <= 64``, or ``N <= 128`` and ``batch_size <= 32``, or
      ``N <= 256`` and ``batch_size <= 4`` (one GEMM per step wins while ``N^2 B`` is small and
      the step is dispatch-bound), else ``"merged"`` with :func:`default_merge` (e.g. 16×32 for
      N=512: at N=512, B=128 about 3× faster than dense forward and backward).

    Args:
        shapes: ``(P_f, Q_f)`` of the original factors.
        batch_size: rows per step.
        device: where the recurrence runs.
        strategy: ``"auto"``, ``"dense"``, ``"merged"`` or ``"factored"``.
        merge: group sizes for ``"merged"`` (must sum to the number of factors).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    f = len(shapes)
    if merge is not None:
        merge = tuple(merge)
        if strategy not in ("auto", "merged"):
            raise ValueError(
                f"merge: expected None with strategy={strategy!r} (a grouping only applies to "
                f"'merged'), got {merge!r}"
            )
        if (
            any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in merge)
            or sum(merge) != f
        ):
            raise ValueError(
                f"merge: expected positive group sizes summing to the number of factors ({f}), "
                f"got {merge!r}"
            )
        return KronPlan("merged", merge)
    if strategy == "dense":
        return KronPlan("dense", (f,))
    if strategy == "factored":
        return KronPlan("factored", (1,) * f)
    if strategy == "merged":
        return KronPlan("merged", default_merge(shapes))
    n = max(math.prod(p for p, _ in shapes), math.prod(q for _, q in shapes))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if f == 1:
        return KronPlan("dense", (1,))
    cpu_dense = n <= 64 or (n <= 128 and batch_size <= 32) or (n <= 256 and batch_size <= 4)
    if (n <= 2048) if dev.type == "cuda" else cpu_dense:
        return KronPlan("dense", (f,))
    return KronPlan("merged", default_merge(shapes))

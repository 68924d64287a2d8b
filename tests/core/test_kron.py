"""kru_core.kron against independent oracles (explicit Kronecker index formula, torch.kron)."""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

from kru_core import factorize, kron_matvec, unitary_penalty
from kru_core.kron import (
    KronPlan,
    apply_kron_factors,
    default_merge,
    kron_matrix,
    plan_recurrence,
)

pytestmark = pytest.mark.usefixtures("one_thread")


SHAPES = {
    "square": [(2, 2), (3, 3), (2, 2)],
    "mixed": [(2, 2), (5, 5), (3, 3), (2, 2)],
    "rectangular": [(2, 3), (4, 2), (3, 5)],
    "single": [(6, 4)],
    "ones": [(1, 3), (4, 1), (2, 2)],
}
DTYPES = [torch.float64, torch.complex128]


def random_factors(shapes, dtype, generator=None):
    return [torch.randn(p, q, dtype=dtype, generator=generator) for p, q in shapes]


def _mixed_radix(digits, radices):
    idx = 0
    for d, r in zip(digits, radices, strict=True):
        idx = idx * r + d
    return idx


def kron_oracle(factors):
    """Independent of torch.kron: W[i, j] = prod_f W_f[i_f, j_f] with i, j in mixed radix,
    factor 0 the most significant digit."""
    ps = [w.shape[0] for w in factors]
    qs = [w.shape[1] for w in factors]
    out = torch.empty(math.prod(ps), math.prod(qs), dtype=factors[0].dtype)
    for i_digits in itertools.product(*[range(p) for p in ps]):
        for j_digits in itertools.product(*[range(q) for q in qs]):
            val = torch.ones((), dtype=factors[0].dtype)
            for w, a, b in zip(factors, i_digits, j_digits, strict=True):
                val = val * w[a, b]
            out[_mixed_radix(i_digits, ps), _mixed_radix(j_digits, qs)] = val
    return out


@pytest.mark.parametrize("name", ["square", "rectangular", "ones"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_kron_matches_index_oracle(name, dtype):
    ws = random_factors(SHAPES[name], dtype)
    torch.testing.assert_close(functools.reduce(torch.kron, ws), kron_oracle(ws))
    torch.testing.assert_close(kron_matrix(ws), kron_oracle(ws))


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("dtype", [*DTYPES, torch.float32, torch.complex64])
def test_kron_matvec_matches_torch_kron(name, dtype):
    g = torch.Generator().manual_seed(0)
    ws = random_factors(SHAPES[name], dtype, g)
    n_in = math.prod(w.shape[1] for w in ws)
    h = torch.randn(7, n_in, dtype=dtype, generator=g)
    expected = h @ functools.reduce(torch.kron, ws).T
    got = kron_matvec(h, ws)
    assert got.shape == (7, math.prod(w.shape[0] for w in ws))
    tol = 1e-12 if dtype in DTYPES else 1e-4
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_kron_matvec_leading_dims_and_add():
    ws = random_factors(SHAPES["mixed"], torch.complex128)
    h = torch.randn(2, 3, 60, dtype=torch.complex128)
    w = functools.reduce(torch.kron, ws)
    torch.testing.assert_close(kron_matvec(h, ws), h @ w.T)
    add = torch.randn(6, 60, dtype=torch.complex128)
    torch.testing.assert_close(
        apply_kron_factors(h.reshape(6, 60), ws, add=add), h.reshape(6, 60) @ w.T + add
    )


def test_apply_kron_factors_grouped_matches_per_group():
    shapes = SHAPES["rectangular"]
    stacked = [torch.randn(4, p, q, dtype=torch.float64) for p, q in shapes]
    h = torch.randn(5, 30, dtype=torch.float64)
    got = apply_kron_factors(h, stacked)
    assert got.shape == (4, 5, 24)
    for g in range(4):
        w = functools.reduce(torch.kron, [s[g] for s in stacked])
        torch.testing.assert_close(got[g], h @ w.T)
    torch.testing.assert_close(kron_matrix(stacked)[1], kron_matrix([s[1] for s in stacked]))


def test_kron_matvec_gradcheck_complex128():
    g = torch.Generator().manual_seed(1)
    ws = [
        w.requires_grad_()
        for w in random_factors([(2, 3), (2, 2), (3, 2)], torch.complex128, generator=g)
    ]
    h = torch.randn(3, 12, dtype=torch.complex128, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, *ws: kron_matvec(h, ws), (h, *ws))


def test_kron_matvec_rejects_bad_shapes():
    ws = random_factors([(2, 2), (3, 3)], torch.float64)
    with pytest.raises(ValueError, match="h: expected last dimension"):
        kron_matvec(torch.randn(2, 5, dtype=torch.float64), ws)
    with pytest.raises(ValueError, match="factors: expected at least one"):
        kron_matvec(torch.randn(2, 5), [])
    with pytest.raises(ValueError, match=r"factors\[0\]: expected a 2-D"):
        kron_matvec(torch.randn(2, 4), [torch.randn(4)])


# --------------------------------------------------------------------------- penalty


def haar_unitary(n, dtype=torch.complex128):
    return torch.linalg.qr(torch.randn(n, n, dtype=dtype))[0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_unitary_penalty_zero_for_unitary_positive_after_perturbation(dtype):
    ws = [haar_unitary(n, dtype) for n in (2, 3, 5)]
    assert float(unitary_penalty(ws)) < 1e-20
    bumped = [ws[0] + 0.1 * torch.randn(2, 2, dtype=dtype), *ws[1:]]
    assert float(unitary_penalty(bumped)) > 1e-4


def test_unitary_penalty_value_matches_definition():
    # ||(2I)^H (2I) - I||_F^2 = 9 n for an n×n factor; sums over factors.
    ws = [2 * torch.eye(3, dtype=torch.complex128), torch.eye(2, dtype=torch.complex128)]
    assert float(unitary_penalty(ws)) == pytest.approx(27.0)
    w = torch.randn(4, 3, dtype=torch.complex128)
    expected = ((w.conj().T @ w - torch.eye(3)).abs() ** 2).sum()
    torch.testing.assert_close(unitary_penalty([w]), expected)
    assert unitary_penalty([]).shape == ()


# --------------------------------------------------------------------------- factorize


def test_factorize_paper_rule():
    assert factorize(512) == (2,) * 9
    assert factorize(411) == (3, 137)
    assert factorize(993) == (3, 331)
    assert factorize(100) == (2, 2, 5, 5)
    assert factorize(45) == (3, 3, 5)
    assert factorize(500, 2) == (20, 25)
    assert factorize(7) == (7,)
    assert factorize(1) == (1,)
    # Merging the two smallest each time (not a balanced split): 2^9 -> 4, 8, 16.
    assert factorize(512, 3) == (4, 8, 16)


@pytest.mark.parametrize(
    ("args", "match"),
    [((0,), "n: expected a positive int"), ((12, 4), "num_factors: expected at most 3")],
)
def test_factorize_errors(args, match):
    with pytest.raises(ValueError, match=match):
        factorize(*args)


# --------------------------------------------------------------------------- plans


def test_default_merge_and_auto_rule():
    two = [(2, 2)] * 9
    assert default_merge(two) == (4, 5)
    assert default_merge([(2, 2)] * 10) == (5, 5)
    assert default_merge([(3, 3), (137, 137)]) == (1, 1)
    assert plan_recurrence(two, batch_size=128) == KronPlan("merged", (4, 5))
    assert plan_recurrence([(2, 2)] * 6, batch_size=128).strategy == "dense"
    assert plan_recurrence([(2, 2)] * 7, batch_size=32).strategy == "dense"
    assert plan_recurrence([(2, 2)] * 7, batch_size=128) == KronPlan("merged", (3, 4))
    assert plan_recurrence([(2, 2)] * 8, batch_size=2).strategy == "dense"
    assert plan_recurrence([(2, 2)] * 8, batch_size=8).strategy == "merged"
    assert plan_recurrence(two, batch_size=128, device="cuda").strategy == "dense"
    assert plan_recurrence(two, batch_size=1, strategy="factored").groups == (1,) * 9
    assert plan_recurrence(two, batch_size=1, merge=(3, 3, 3)) == KronPlan("merged", (3, 3, 3))


def test_plan_effective_factors_are_torch_kron_of_groups():
    ws = random_factors(SHAPES["mixed"], torch.complex128)
    mats = KronPlan("merged", (1, 2, 1)).effective_factors(ws)
    torch.testing.assert_close(mats[1], torch.kron(ws[1], ws[2]))
    h = torch.randn(3, 60, dtype=torch.complex128)
    torch.testing.assert_close(apply_kron_factors(h, mats), kron_matvec(h, ws))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "fast"}, "strategy: expected one of"),
        ({"merge": (4, 4)}, "merge: expected positive group sizes summing to the number"),
        ({"merge": (9,), "strategy": "dense"}, "merge: expected None with strategy='dense'"),
    ],
)
def test_plan_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_recurrence([(2, 2)] * 9, batch_size=1, **kwargs)

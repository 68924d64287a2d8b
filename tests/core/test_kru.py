"""KRU and KRUCell against a dense oracle recurrence built from torch.kron of the factors."""

from __future__ import annotations

import functools

import pytest
import torch
from torch.func import functional_call

from kru_core import KRU, KRUCell
from kru_core.activations import activation_backward, apply_activation
from kru_core.recurrence import backend_status

#: Every backend this machine can run (the first call builds the CPU operator, once per
#: machine), and the step-by-step autograd loop ("unfused", the eager reference).
BACKENDS = ["eager", *(b for b in ("cpu", "triton") if backend_status(b) is None)]
MODES = [*BACKENDS, "unfused"]


def set_mode(kru, mode):
    kru.fused = mode != "unfused"
    kru.backend = "eager" if mode == "unfused" else mode


pytestmark = pytest.mark.usefixtures("one_thread")


STRATEGIES = [
    ("dense", None),
    ("merged", None),
    ("factored", None),
    ("merged", (1, 2)),
]
FACTORS = {
    "square": [2, 2, 2],
    "mixed": [2, 3, 2],
    "rectangular": [(2, 3), (3, 2), (2, 2)],
}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def oracle_matrix(kru):
    return functools.reduce(torch.kron, [w.detach() for w in kru.recurrent_factors])


def oracle_forward(kru, x, h0, params=None):
    """Dense recurrence h_t = act(h_{t-1} W^T + x_t U^T (+ b)) with W = torch.kron(...)."""
    p = dict(kru.named_parameters()) if params is None else params
    factors = [p[f"recurrent_factors.{i}"] for i in range(len(kru.recurrent_factors))]
    w = functools.reduce(torch.kron, factors)
    u = x.to(kru.state_dtype) @ p["weight_ih"].T
    bias = p.get("bias")
    if bias is not None and kru.activation != "modrelu":
        u = u + bias
    h, outs = h0, []
    for t in range(x.shape[1]):
        z = h @ w.T + u[:, t]
        if kru.activation == "modrelu":
            r = z.abs()
            b = bias.clamp(max=0.0) if bias is not None else 0  # the bias acts as min(b, 0)
            h = z * torch.relu(r + b) / (r + 1e-5)
        else:
            h = {
                "identity": lambda z: z,
                "tanh": torch.tanh,
                "split_relu": lambda z: (
                    torch.complex(torch.relu(z.real), torch.relu(z.imag))
                    if z.is_complex()
                    else torch.relu(z)
                ),
            }[kru.activation](z)
        outs.append(h)
    return torch.stack(outs, 1), h


def make(factors="mixed", seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("dtype", torch.float64)
    n = functools.reduce(lambda a, f: a * (f if isinstance(f, int) else f[0]), FACTORS[factors], 1)
    kru = KRU(3, n, factors=FACTORS[factors], **kw)
    if kru.bias is not None:
        with torch.no_grad():
            kru.bias.uniform_(-0.3, 0.3)  # make modReLU's bias matter (b > 0 acts as 0)
    return kru


# --------------------------------------------------------------------------- counts


@pytest.mark.parametrize(
    ("n", "factors", "is_complex", "expected"),
    [
        (512, None, True, 72),
        (411, None, True, 37_556),
        (993, None, True, 219_140),
        (100, None, False, 58),
        (100, None, True, 116),
    ],
)
def test_paper_recurrent_parameter_counts(n, factors, is_complex, expected):
    kru = KRU(1, n, factors=factors, complex=is_complex)
    assert kru.num_recurrent_parameters() == expected


# --------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("factors", list(FACTORS))
@pytest.mark.parametrize("is_complex", [True, False])
def test_recurrent_matrix_is_kron_of_factors(factors, is_complex):
    kru = make(factors, complex=is_complex)
    torch.testing.assert_close(kru.recurrent_matrix().detach(), oracle_matrix(kru))


@pytest.mark.parametrize("factors", list(FACTORS))
@pytest.mark.parametrize(("strategy", "merge"), STRATEGIES)
@pytest.mark.parametrize("mode", MODES)
def test_identity_recurrence_is_matrix_power(factors, strategy, merge, mode):
    kru = make(factors, activation="identity", bias=False, strategy=strategy, merge=merge)
    set_mode(kru, mode)
    n = kru.hidden_size
    h0 = torch.randn(4, n, dtype=torch.complex128)
    steps = 6
    x = torch.zeros(4, steps, 3, dtype=torch.float64)
    with torch.no_grad():
        out, h_n = kru(x, h0)
    wt = oracle_matrix(kru).T
    for t in range(steps):
        expected = h0 @ torch.linalg.matrix_power(wt, t + 1)
        torch.testing.assert_close(out[:, t], expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h_n, out[:, -1])


@pytest.mark.parametrize(("strategy", "merge"), STRATEGIES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("activation", "is_complex", "factors"),
    [
        ("modrelu", True, "mixed"),
        ("modrelu", True, "rectangular"),
        ("split_relu", True, "mixed"),
        ("identity", True, "square"),
        ("modrelu", False, "mixed"),
        ("tanh", False, "rectangular"),
        ("split_relu", False, "square"),
    ],
)
def test_every_strategy_matches_oracle_forward_and_backward(
    strategy, merge, mode, activation, is_complex, factors
):
    kru = make(factors, activation=activation, complex=is_complex, strategy=strategy, merge=merge)
    set_mode(kru, mode)
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    h0 = torch.randn(3, kru.hidden_size, dtype=kru.state_dtype)
    weights = torch.randn(3, 5, kru.hidden_size, dtype=kru.state_dtype)

    def loss_of(out, h_n):
        return (out * weights).real.sum() + h_n.abs().pow(2).sum()

    h0_a = h0.clone().requires_grad_()
    out, h_n = kru(x, h0_a)
    loss_of(out, h_n).backward()
    params = {k: v.detach().clone().requires_grad_() for k, v in kru.named_parameters()}
    h0_b = h0.clone().requires_grad_()
    out_o, h_n_o = oracle_forward(kru, x, h0_b, params)
    loss_of(out_o, h_n_o).backward()

    torch.testing.assert_close(out, out_o.detach(), rtol=1e-10, atol=1e-10)
    with torch.no_grad():  # the autograd-free loop (inference)
        torch.testing.assert_close(kru(x, h0)[0], out_o.detach(), rtol=1e-10, atol=1e-10)
    for name, p in kru.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-9, atol=1e-9, msg=name)
    torch.testing.assert_close(h0_a.grad, h0_b.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    ("activation", "strategy"), [("modrelu", "merged"), ("split_relu", "dense")]
)
def test_gradcheck_short_kru_complex128(mode, activation, strategy):
    kru = make("rectangular", activation=activation, strategy=strategy, merge=None)
    set_mode(kru, mode)
    names = [n for n, _ in kru.named_parameters()]
    x = torch.randn(2, 3, 3, dtype=torch.float64)
    h0 = torch.randn(2, kru.hidden_size, dtype=torch.complex128, requires_grad=True)

    def fn(h0, *values):
        out, _ = functional_call(kru, dict(zip(names, values, strict=True)), (x, h0))
        return out

    values = [p.detach().clone().requires_grad_() for p in kru.parameters()]
    # fast_mode checks random projections of the Jacobian (complex inputs included), in seconds.
    assert torch.autograd.gradcheck(fn, (h0, *values), fast_mode=True)


def test_gradcheck_tiny_fused_kru_full_jacobian():
    torch.manual_seed(3)
    kru = KRU(1, 4, factors=[2, 2], merge=(1, 1), dtype=torch.float64)
    with torch.no_grad():
        kru.bias.fill_(-0.1)
    names = [n for n, _ in kru.named_parameters()]
    x = torch.randn(2, 3, 1, dtype=torch.float64)

    def fn(*values):
        return functional_call(kru, dict(zip(names, values, strict=True)), (x,))[0]

    values = [p.detach().clone().requires_grad_() for p in kru.parameters()]
    assert torch.autograd.gradcheck(fn, tuple(values))


@pytest.mark.parametrize("activation", ["modrelu", "split_relu", "tanh", "identity"])
@pytest.mark.parametrize("is_complex", [True, False])
def test_activation_backward_matches_autograd(activation, is_complex):
    if activation == "tanh" and is_complex:
        pytest.skip("tanh is real-only")
    dtype = torch.complex128 if is_complex else torch.float64
    z = torch.randn(4, 6, dtype=dtype, requires_grad=True)
    bias = torch.linspace(-0.8, 0.8, 6, dtype=torch.float64)
    h = apply_activation(activation, z, bias)
    g = torch.randn_like(h)
    (auto,) = torch.autograd.grad(h, z, g)
    manual, _ = activation_backward(activation, z.detach(), h.detach(), g, bias)
    torch.testing.assert_close(manual, auto)


# --------------------------------------------------------------------------- behaviour


def test_cell_stepping_equals_layer_forward():
    layer = make("mixed", dtype=torch.float32)
    x = torch.randn(4, 7, 3)
    out, h_n = layer(x)
    for cell in (KRUCell.from_layer(layer), _loaded_cell(layer)):
        h = None
        for t in range(7):
            h = cell(x[:, t], h)
            torch.testing.assert_close(h, out[:, t])
        torch.testing.assert_close(h, h_n)


def _loaded_cell(layer):
    cell = KRUCell(3, layer.hidden_size, factors=FACTORS["mixed"])
    cell.load_state_dict(layer.state_dict())
    return cell


def test_token_inputs_are_an_embedding_of_u():
    kru = make("square", dtype=torch.float32)
    tokens = torch.randint(0, 3, (2, 5))
    one_hot = torch.nn.functional.one_hot(tokens, 3).float()
    torch.testing.assert_close(kru(tokens)[0], kru(one_hot)[0])
    cell = KRUCell.from_layer(kru)
    with torch.no_grad():
        h = cell(tokens[:, 0])
        h = cell(tokens[:, 1], h)  # second call reuses the cached plan matrices
    torch.testing.assert_close(h, kru(tokens)[0][:, 1])


def test_cell_cache_follows_parameter_updates():
    kru = make("square", dtype=torch.float64)
    cell = KRUCell.from_layer(kru)
    x = torch.randn(2, 3, dtype=torch.float64)
    h0 = torch.ones(2, 8, dtype=torch.complex128)
    with torch.no_grad():
        first = cell(x, h0)
        kru.recurrent_factors[0].mul_(2.0)  # in place: the cached plan must be rebuilt
        second = cell(x, h0)
        expected = oracle_forward(kru, x[:, None], h0)[1]
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, expected)


def test_batch_first_false():
    kru = make("mixed")
    kru_tm = make("mixed", batch_first=False)
    kru_tm.load_state_dict(kru.state_dict())
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    out, h_n = kru(x)
    out_tm, h_n_tm = kru_tm(x.transpose(0, 1))
    assert out_tm.shape == (5, 2, kru.hidden_size)
    torch.testing.assert_close(out_tm.transpose(0, 1), out)
    torch.testing.assert_close(h_n_tm, h_n)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("activation", ["modrelu", "split_relu"])
def test_every_parameter_gets_a_gradient(mode, activation):
    kru = make("mixed", activation=activation, dtype=torch.float32)
    set_mode(kru, mode)
    out, _ = kru(torch.randn(3, 6, 3))
    out.abs().sum().backward()
    for name, p in kru.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------- modReLU bias


@pytest.mark.parametrize("mode", MODES)
def test_positive_modrelu_bias_acts_as_zero_through_long_zero_input(mode):
    """Pixel MNIST's blow-up: black pixels keep z = 0 for a hundred steps, where a positive
    modReLU bias had a gain of b / eps = 1e4 per step; the gradient overflowed at step 4."""
    x = torch.zeros(2, 300, 1, dtype=torch.float64)
    x[:, 150:] = torch.rand(2, 150, 1, dtype=torch.float64)
    grads, outs = [], []
    for b in (0.1, 0.0):
        torch.manual_seed(0)
        kru = KRU(1, 16, dtype=torch.complex128)
        set_mode(kru, mode)
        with torch.no_grad():
            kru.bias.fill_(b)
        xs = x.clone().requires_grad_()
        out, _ = kru(xs)
        out[:, -1].abs().sum().backward()
        outs.append(out.detach())
        grads.append(xs.grad)
    assert torch.isfinite(grads[0]).all() and grads[0].abs().max() < 10
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode", MODES)
def test_backward_through_unitary_kru_cannot_grow(seed, mode):
    """With a unitary W and b <= 0 every step is 1-Lipschitz, so for L = Re<c, h_T> the
    gradient reaching h_0 is no larger than |c|, whatever the inputs and biases."""
    g = torch.Generator().manual_seed(seed)
    kru = KRU(1, 32, dtype=torch.complex128)
    set_mode(kru, mode)
    with torch.no_grad():
        kru.bias.copy_(-0.5 * torch.rand(32, generator=g, dtype=torch.float64))
        kru.weight_ih.mul_(3)
    x = torch.randn(3, 120, 1, generator=g, dtype=torch.float64)
    h0 = torch.randn(3, 32, generator=g, dtype=torch.complex128).requires_grad_()
    c = torch.randn(3, 32, generator=g, dtype=torch.complex128)
    out, _ = kru(x, h0)
    (out[:, -1] * c.conj()).real.sum().backward()
    assert (h0.grad.abs().norm(dim=1) <= c.abs().norm(dim=1) * (1 + 1e-9)).all()
    assert h0.grad.abs().sum() > 0


def test_constrain_projects_the_modrelu_bias_only():
    kru = KRU(1, 8)
    with torch.no_grad():
        kru.bias.copy_(torch.linspace(-1, 1, 8))
    kru.constrain_()
    assert (kru.bias <= 0).all() and kru.bias[0] == -1
    # A bias projected onto 0 still learns: the clamp passes the gradient at b = 0.
    out, _ = kru(torch.randn(2, 5, 1))
    out.abs().sum().backward()
    assert (kru.bias.grad[kru.bias == 0] != 0).all()
    additive = KRU(1, 8, activation="split_relu")
    with torch.no_grad():
        additive.bias.fill_(1 + 1j)
    additive.constrain_()
    assert (additive.bias == 1 + 1j).all()


def test_defaults_dtypes_and_shapes():
    kru = KRU(1, 16)
    out, h_n = kru(torch.randn(2, 3, 1))
    assert out.shape == (2, 3, 16) and out.dtype == torch.complex64
    assert h_n.shape == (2, 16)
    assert kru.bias.dtype == torch.float32 and kru.bias.shape == (16,)
    real = KRU(1, 16, complex=False, activation="tanh", dtype=torch.float64)
    assert real(torch.randn(2, 3, 1))[0].dtype == torch.float64
    assert KRU(1, 16, dtype=torch.complex128).state_dtype == torch.complex128
    assert "factors=(2, 2, 2, 2)" in repr(kru)
    assert kru.plan(128).strategy == "dense"
    assert KRU(1, 512).plan(128).groups == (4, 5)


# --------------------------------------------------------------------------- penalty


def test_unitary_penalty_reset_perturb_and_optimise():
    kru = KRU(2, 64, factors=[2, 4, 8])
    assert kru.unitary_penalty().shape == ()
    assert kru.unitary_penalty().item() < 1e-10
    with torch.no_grad():
        for w in kru.recurrent_factors:
            w.add_(0.2 * torch.randn_like(w))
    before = kru.unitary_penalty().item()
    assert before > 1e-2
    opt = torch.optim.Adam(kru.recurrent_factors.parameters(), lr=1e-2)
    for _ in range(30):
        opt.zero_grad()
        kru.unitary_penalty().backward()
        opt.step()
    assert kru.unitary_penalty().item() < 0.5 * before
    kru.reset_parameters()
    assert kru.unitary_penalty().item() < 1e-10


def test_reset_gives_unitary_w_and_orthonormal_rectangular_factors():
    kru = KRU(1, 12, factors=[(2, 3), (6, 4)], complex=True, dtype=torch.float64)
    tall = kru.recurrent_factors[1]  # 6×4: orthonormal columns
    torch.testing.assert_close(tall.mH @ tall, torch.eye(4, dtype=torch.complex128))
    wide = kru.recurrent_factors[0]  # 2×3: orthonormal rows
    torch.testing.assert_close(wide @ wide.mH, torch.eye(2, dtype=torch.complex128))
    sq = KRU(1, 12, factors=[3, 4], complex=False, dtype=torch.float64).recurrent_matrix()
    torch.testing.assert_close(sq.T @ sq, torch.eye(12, dtype=torch.float64))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((1, 12), {"factors": [2, 2, 2]}, "factors: expected factor sizes whose products"),
        ((1, 12), {"factors": [(2, 3), (6, 3)]}, r"factors: .*prod Q = 9"),
        ((1, 12), {"factors": [0, 12]}, "factors: expected positive ints"),
        ((1, 12), {"factors": "2,6"}, "factors: expected a list"),
        ((1, 8), {"activation": "relu"}, "activation: expected one of"),
        ((1, 8), {"activation": "tanh"}, "activation: expected .* with complex=True"),
        ((0, 8), {}, "input_size: expected a positive int, got 0"),
        ((1, -3), {}, "hidden_size: expected a positive int, got -3"),
        ((1, 8), {"strategy": "magic"}, "strategy: expected one of"),
        ((1, 8), {"merge": (2, 2)}, "merge: expected positive group sizes"),
        ((1, 8), {"complex": False, "dtype": torch.complex64}, "dtype: expected a real dtype"),
        ((1, 8), {"dtype": torch.int32}, "dtype: expected a floating"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        KRU(*args, **kwargs)


def test_bad_inputs_raise_value_error():
    kru = KRU(3, 8)
    with pytest.raises(ValueError, match="x: expected last dimension input_size=3"):
        kru(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="x: expected"):
        kru(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"h0: expected shape \(2, 8\)"):
        kru(torch.randn(2, 4, 3), torch.zeros(3, 8, dtype=torch.complex64))


# --------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("strategy", ["auto", "dense", "merged", "factored"])
def test_cuda_matches_cpu(strategy):
    kru = make("mixed", strategy=strategy, dtype=torch.float64)
    x = torch.randn(3, 6, 3, dtype=torch.float64)
    out, _ = kru(x)
    out.abs().sum().backward()
    grads = {n: p.grad.clone() for n, p in kru.named_parameters()}
    kru_cuda = make("mixed", strategy=strategy, dtype=torch.float64, device="cuda")
    kru_cuda.load_state_dict(kru.state_dict())
    out_c, _ = kru_cuda(x.cuda())
    out_c.abs().sum().backward()
    torch.testing.assert_close(out_c.cpu(), out.detach())
    for n, p in kru_cuda.named_parameters():
        torch.testing.assert_close(p.grad.cpu(), grads[n], msg=n)
    big = KRU(1, 512, device="cuda")
    assert big.plan(128).strategy == "dense"
    out_b, _ = big(torch.randn(4, 5, 1, device="cuda"))
    assert out_b.is_cuda and torch.isfinite(torch.view_as_real(out_b)).all()

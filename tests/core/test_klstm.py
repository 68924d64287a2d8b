"""KLSTM against torch.nn.LSTM loaded with the dense Kronecker gate matrices (the oracle)."""

from __future__ import annotations

import functools

import pytest
import torch

from kru_core import KLSTM

pytestmark = pytest.mark.usefixtures("one_thread")


def make(strategy="auto", merge=None, factors=(3, (2, 4), (2, 1)), hidden=12, seed=0):
    torch.manual_seed(seed)
    return KLSTM(
        5, hidden, factors=list(factors), strategy=strategy, merge=merge, dtype=torch.float64
    )


def oracle_lstm(klstm):
    """nn.LSTM whose weight_hh is the torch.kron of each gate's factors."""
    f = len(klstm.factor_shapes)
    factors = list(klstm.recurrent_factors)
    w_hh = torch.cat([functools.reduce(torch.kron, factors[g * f : (g + 1) * f]) for g in range(4)])
    ref = torch.nn.LSTM(klstm.input_size, klstm.hidden_size, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        ref.weight_hh_l0.copy_(w_hh)
        ref.weight_ih_l0.copy_(klstm.weight_ih)
        ref.bias_ih_l0.copy_(klstm.bias)
        ref.bias_hh_l0.zero_()
    return ref


def test_paper_counts():
    assert KLSTM(88, 45).num_recurrent_parameters() == 172  # (3, 3, 5) per gate
    assert KLSTM(50, 500, factors=[2, 250]).num_recurrent_parameters() == 250_016
    assert KLSTM(88, 45).factor_shapes == ((3, 3), (3, 3), (5, 5))


def test_recurrent_matrix_matches_oracle():
    klstm = make()
    torch.testing.assert_close(klstm.recurrent_matrix(), oracle_lstm(klstm).weight_hh_l0)


@pytest.mark.parametrize(
    ("strategy", "merge"), [("dense", None), ("merged", None), ("factored", None), ("auto", (2, 1))]
)
def test_forward_and_backward_match_nn_lstm(strategy, merge):
    klstm = make(strategy, merge)
    ref = oracle_lstm(klstm)
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    h0 = torch.randn(3, 12, dtype=torch.float64)
    c0 = torch.randn(3, 12, dtype=torch.float64)
    out, (h, c) = klstm(x, (h0, c0))
    out_r, (h_r, c_r) = ref(x, (h0[None], c0[None]))
    torch.testing.assert_close(out, out_r)
    torch.testing.assert_close(h, h_r[0])
    torch.testing.assert_close(c, c_r[0])
    weights = torch.randn_like(out)
    (out * weights).sum().backward()
    (out_r * weights).sum().backward()
    torch.testing.assert_close(klstm.weight_ih.grad, ref.weight_ih_l0.grad)
    torch.testing.assert_close(klstm.bias.grad, ref.bias_ih_l0.grad)
    # Gradient of each factor from the dense oracle's weight_hh gradient via torch.kron.
    leaves = [w.detach().clone().requires_grad_() for w in klstm.recurrent_factors]
    f = len(klstm.factor_shapes)
    w_hh = torch.cat([functools.reduce(torch.kron, leaves[g * f : (g + 1) * f]) for g in range(4)])
    expected = torch.autograd.grad(w_hh, leaves, ref.weight_hh_l0.grad)
    for w, e in zip(klstm.recurrent_factors, expected, strict=True):
        torch.testing.assert_close(w.grad, e)


def test_every_parameter_gets_a_gradient_and_batch_first_false():
    klstm = make()
    tm = KLSTM(5, 12, factors=[3, (2, 4), (2, 1)], batch_first=False, dtype=torch.float64)
    tm.load_state_dict(klstm.state_dict())
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    out, (h, _) = klstm(x)
    out_tm, (h_tm, _) = tm(x.transpose(0, 1))
    torch.testing.assert_close(out_tm.transpose(0, 1), out)
    torch.testing.assert_close(h_tm, h)
    out.sum().backward()
    for name, p in klstm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_lengths_freeze_the_state_after_the_last_valid_step():
    klstm = make()
    x = torch.randn(3, 6, 5, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 4])
    _, (h, c) = klstm(x, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        _, (h_b, c_b) = klstm(x[b : b + 1, :n])
        torch.testing.assert_close(h[b], h_b[0])
        torch.testing.assert_close(c[b], c_b[0])


def test_tokens_equal_one_hot_features():
    klstm = make()
    tokens = torch.randint(0, 5, (2, 4))
    one_hot = torch.nn.functional.one_hot(tokens, 5).double()
    torch.testing.assert_close(klstm(tokens)[0], klstm(one_hot)[0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"complex": True}, "complex: expected False"),
        ({"factors": [3, 5]}, "factors: expected factor sizes whose products"),
        ({"strategy": "x"}, "strategy: expected one of"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        KLSTM(4, 12, **kwargs)
    with pytest.raises(ValueError, match="hidden_size: expected a positive int"):
        KLSTM(4, 0)


def test_bad_state():
    klstm = make()
    with pytest.raises(ValueError, match=r"hx\[1\]: expected shape \(2, 12\)"):
        klstm(torch.randn(2, 3, 5, dtype=torch.float64), (torch.zeros(2, 12), torch.zeros(1, 12)))

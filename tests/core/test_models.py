"""SequenceModel: parameter counts from the paper, heads, lengths, state continuation, errors."""

from __future__ import annotations

import pytest
import torch

from kru_core import SequenceModel

pytestmark = pytest.mark.usefixtures("one_thread")


CELLS = ["kru", "kru_lstm", "rnn", "lstm"]


def make(cell, *, tokens=True, head="per_step", **kw):
    torch.manual_seed(0)
    inputs = {"vocab_size": 6} if tokens else {"input_size": 3}
    return SequenceModel(cell=cell, hidden_size=8, output_size=4, head=head, **inputs, **kw)


def sample(tokens, batch=3, steps=5):
    if tokens:
        return torch.randint(0, 6, (batch, steps))
    return torch.randn(batch, steps, 3)


# --------------------------------------------------------------------------- counts


def test_pixel_mnist_parameter_count():
    # 72 (nine complex 2x2) + 1,024 (complex U) + 512 (modReLU bias) + 10,250 (readout).
    model = SequenceModel(cell="kru", input_size=1, hidden_size=512, output_size=10, head="last")
    assert model.parameter_counts() == {"total": 11_858, "recurrent": 72}


@pytest.mark.parametrize(
    ("cell", "hidden", "factors", "total", "recurrent"),
    [
        # PTB (vocabulary 50), paper Table 3: ≈120K / ≈38K, ≈418K / ≈220K, ≈377K / ≈250K,
        # ≈420K / 360K, ≈127K / 90K.
        ("kru", 411, None, 120_217, 37_556),
        ("kru", 993, None, 418_783, 219_140),
        ("kru_lstm", 500, [2, 250], 377_066, 250_016),
        ("rnn", 600, None, 421_250, 360_000),
        ("lstm", 150, None, 128_750, 90_000),
    ],
)
def test_ptb_parameter_counts(cell, hidden, factors, total, recurrent):
    model = SequenceModel(
        cell=cell, vocab_size=50, hidden_size=hidden, output_size=50, factors=factors
    )
    assert model.parameter_counts() == {"total": total, "recurrent": recurrent}


def test_music_counts():
    kru = SequenceModel(
        cell="kru",
        input_size=88,
        hidden_size=100,
        output_size=88,
        complex=False,
        activation="split_relu",
    )
    assert kru.parameter_counts()["recurrent"] == 58
    klstm = SequenceModel(cell="kru_lstm", input_size=88, hidden_size=45, output_size=88)
    assert klstm.parameter_counts()["recurrent"] == 172


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("tokens", [True, False])
def test_heads_shapes_and_penalty(cell, tokens):
    per_step = make(cell, tokens=tokens)
    logits, _ = per_step(sample(tokens))
    assert logits.shape == (3, 5, 4) and logits.dtype == torch.float32
    last = make(cell, tokens=tokens, head="last")
    logits, _ = last(sample(tokens))
    assert logits.shape == (3, 4)
    penalty = last.unitary_penalty()
    assert penalty.shape == ()
    if cell == "kru":
        assert 0 <= penalty.item() < 1e-9
        assert len(last.factor_parameters()) == 3
    else:
        assert penalty.item() == 0.0
        assert len(last.factor_parameters()) == (12 if cell == "kru_lstm" else 0)


@pytest.mark.parametrize("cell", CELLS)
def test_continuing_from_the_returned_state_equals_one_pass(cell):
    model = make(cell)
    x = sample(True, steps=6)
    full, _ = model(x)
    first, state = model(x[:, :4])
    second, _ = model(x[:, 4:], hx=state)
    torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=1e-5, atol=1e-5)
    # One token at a time (text generation).
    state = None
    for t in range(6):
        step, state = model(x[:, t : t + 1], hx=state)
        torch.testing.assert_close(step[:, 0], full[:, t], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("tokens", [True, False])
def test_last_head_reads_each_sequence_at_its_length(cell, tokens):
    model = make(cell, tokens=tokens, head="last")
    x = sample(tokens, steps=6)
    lengths = torch.tensor([6, 2, 4])
    logits, state = model(x, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        alone, state_b = model(x[b : b + 1, :n])
        torch.testing.assert_close(logits[b], alone[0], rtol=1e-5, atol=1e-5)
        for s, s_b in zip(_tensors(state), _tensors(state_b), strict=True):
            torch.testing.assert_close(s[..., b, :], s_b[..., 0, :], rtol=1e-5, atol=1e-5)


def _tensors(state):
    return list(state) if isinstance(state, tuple) else [state]


def test_readout_acts_on_real_and_imaginary_parts():
    model = make("kru", head="last")
    x = sample(True)
    logits, h = model(x)
    expected = model.readout(torch.cat([h.real, h.imag], -1))
    torch.testing.assert_close(logits, expected)
    assert model.readout.in_features == 16


def test_gradients_reach_every_parameter():
    for cell in CELLS:
        model = make(cell, tokens=False)
        logits, _ = model(sample(False))
        (logits.pow(2).sum() + model.unitary_penalty()).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None, (cell, name)
            assert torch.isfinite(p.grad).all(), (cell, name)
            assert p.grad.abs().sum() > 0, f"{cell}: {name} gets a zero gradient"


def test_kru_learns_a_tiny_task():
    # Classify whether the first token of a length-8 sequence is 1: needs memory over 8 steps.
    torch.manual_seed(0)
    model = SequenceModel(cell="kru", vocab_size=2, hidden_size=16, output_size=2, head="last")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randint(0, 2, (64, 8))
    y = x[:, 0]
    for _ in range(60):
        opt.zero_grad()
        logits, _ = model(x)
        loss = torch.nn.functional.cross_entropy(logits, y) + 1e-3 * model.unitary_penalty()
        loss.backward()
        opt.step()
    accuracy = (model(x)[0].argmax(-1) == y).float().mean().item()
    assert accuracy > 0.95


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cell": "gru"}, "cell: expected one of"),
        ({"head": "mean"}, "head: expected one of"),
        ({"input_size": 3}, "vocab_size, input_size: expected exactly one"),
        ({"vocab_size": None}, "vocab_size, input_size: expected exactly one"),
        ({"hidden_size": 0}, "hidden_size: expected a positive int"),
        ({"output_size": -1}, "output_size: expected a positive int"),
        ({"cell": "rnn", "factors": [2, 4]}, "factors: expected None for cell='rnn'"),
        ({"factors": [3, 3]}, "factors: expected factor sizes"),
        ({"activation": "tanh"}, "activation: expected"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"cell": "kru", "vocab_size": 5, "hidden_size": 8, "output_size": 2} | kwargs
    with pytest.raises(ValueError, match=match):
        SequenceModel(**args)


def test_bad_inputs():
    model = make("kru")
    with pytest.raises(ValueError, match=r"x: expected \(B, T\) integer token ids"):
        model(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match=r"lengths: expected values in 1\.\.5"):
        model(sample(True), lengths=torch.tensor([5, 0, 3]))
    with pytest.raises(ValueError, match=r"lengths: expected a \(3,\) integer tensor"):
        model(sample(True), lengths=torch.tensor([5, 3]))
    features = make("lstm", tokens=False)
    with pytest.raises(ValueError, match=r"x: expected \(B, T, 3\) float features"):
        features(torch.randn(2, 3, 4))

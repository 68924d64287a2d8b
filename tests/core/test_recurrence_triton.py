"""The ``triton`` recurrence backend (kru_core/recurrence/triton_backend.py) against ``eager``.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``,
set by tests/conftest.py before triton is imported); the shapes are small because the
interpreter runs every block operation with numpy. The ``gpu`` tests run the compiled kernels
and the CUDA-graph fallback on CUDA.
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_recurrence_backends import _inputs, _run

from kru_core import KRU
from kru_core.recurrence import backend_status, run_recurrence

triton_backend = pytest.importorskip("kru_core.recurrence.triton_backend")

interpreted = pytest.mark.skipif(
    not triton_backend.interpreting() or backend_status("triton") is not None,
    reason="needs triton with TRITON_INTERPRET=1",
)
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available() or triton_backend.interpreting(),
    reason="needs CUDA (and compiled Triton kernels)",
)

TOL = {
    torch.float64: {"rtol": 1e-9, "atol": 1e-9},
    torch.complex128: {"rtol": 1e-9, "atol": 1e-9},
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.complex64: {"rtol": 1e-4, "atol": 1e-4},
}


def assert_matches_eager(shapes, dtype, steps, batch, activation, *, device="cpu", bias=True):
    """Outputs and every gradient (u, h0, each factor, bias) of triton equal eager's; returns the
    max abs error of the output and of each gradient (over ``max(1, max |eager's|)``)."""
    u, h0, mats, b, weights = _inputs(shapes, dtype, steps, batch, activation)
    if not bias:
        b = None
    if device != "cpu":
        u, h0, weights = (t.detach().to(device).requires_grad_() for t in (u, h0, weights))
        mats = [m.detach().to(device).requires_grad_() for m in mats]
        b = b.detach().to(device).requires_grad_() if b is not None else None
    out_e, grads_e = _run("eager", u, h0, mats, b, weights, activation)
    out_t, grads_t = _run("triton", u, h0, mats, b, weights, activation)
    tol = TOL[dtype]
    torch.testing.assert_close(out_t, out_e, **tol)
    names = ["u", "h0", *(f"mats[{k}]" for k in range(len(shapes))), "bias"]
    errors = {"out": float((out_t - out_e).abs().max())}
    for name, gt, ge in zip(names, grads_t, grads_e, strict=False):
        scale = max(1.0, float(ge.abs().max()))
        torch.testing.assert_close(gt / scale, ge / scale, **tol, msg=name)
        errors[name] = float((gt - ge).abs().max()) / scale
    return errors


CASES = [
    # (factor shapes, steps, batch)
    ([(2, 2), (2, 2), (2, 2)], 7, 3),  # three square 2x2 factors (state kept in registers)
    ([(3, 3), (5, 5)], 5, 19),  # odd factors [3, 5], a full and a partial 16-row tile
    ([(2, 2), (3, 3), (2, 2)], 4, 5),  # [2, 3, 2]
    ([(2, 3), (3, 2)], 4, 16),  # rectangular (state re-read by Q digits every step)
    ([(2, 3), (3, 2), (2, 2)], 1, 1),  # T = 1, batch 1
    ([(4, 4)], 3, 8),  # one (dense) matrix
    ([(2, 2), (2, 2)], 50, 2),  # longer T
    ([(16, 16), (16, 16)], 3, 2),  # tl.dot-sized factors (float32 takes the tl.dot path)
]
ACTIVATIONS = [
    ("modrelu", torch.complex128),
    ("split_relu", torch.complex128),
    ("identity", torch.complex128),
    ("modrelu", torch.complex64),
    ("modrelu", torch.float64),
    ("split_relu", torch.float32),
    ("tanh", torch.float64),
    ("tanh", torch.float32),
    ("identity", torch.float32),
]


@interpreted
@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize(("shapes", "steps", "batch"), CASES)
@pytest.mark.parametrize(("activation", "dtype"), ACTIVATIONS)
def test_triton_equals_eager_outputs_and_all_gradients(shapes, steps, batch, activation, dtype):
    assert_matches_eager(shapes, dtype, steps, batch, activation)


@interpreted
@pytest.mark.parametrize("dtype", [torch.complex128, torch.float32])
def test_modrelu_without_bias(dtype):
    assert_matches_eager([(3, 3), (2, 2)], dtype, 6, 17, "modrelu", bias=False)


@interpreted
def test_more_than_three_factors_are_merged_and_gradients_reach_each():
    # Five factors: merged into at most three with torch.kron before the kernel.
    shapes = [(2, 2), (2, 2), (3, 3), (2, 2), (2, 2)]
    errors = assert_matches_eager(shapes, torch.complex128, 4, 3, "modrelu")
    assert f"mats[{len(shapes) - 1}]" in errors and "bias" in errors


@interpreted
def test_only_the_requested_gradients_are_computed():
    u, h0, mats, bias, weights = _inputs([(2, 3), (3, 2)], torch.complex128, 5, 4, "modrelu")
    h0 = h0.detach()
    mats = [m.detach() for m in mats]
    bias = bias.detach()
    out = run_recurrence(u, h0, mats, activation="modrelu", bias=bias, backend="triton")
    (grad_u,) = torch.autograd.grad(torch.view_as_real(out).mul(weights).sum(), [u])
    ref = run_recurrence(u, h0, mats, activation="modrelu", bias=bias, backend="eager")
    (grad_ref,) = torch.autograd.grad(torch.view_as_real(ref).mul(weights).sum(), [u])
    torch.testing.assert_close(grad_u, grad_ref, rtol=1e-10, atol=1e-10)


@interpreted
def test_inference_forward_without_gradients():
    u, h0, mats, bias, _ = _inputs([(3, 3), (5, 5)], torch.complex64, 8, 19, "modrelu")
    with torch.inference_mode():
        out = run_recurrence(u, h0, mats, activation="modrelu", bias=bias, backend="triton")
        ref = run_recurrence(u, h0, mats, activation="modrelu", bias=bias, backend="eager")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def kru_and_eager_twin(
    input_size: int, hidden_size: int, backend: str, **kwargs
) -> tuple[KRU, KRU]:
    """A KRU layer on ``backend`` and an eager one with the same weights (drawn from seed 0)."""
    torch.manual_seed(0)
    ref = KRU(input_size, hidden_size, backend="eager", **kwargs)
    kru = KRU(input_size, hidden_size, backend=backend, **kwargs)
    kru.load_state_dict(ref.state_dict())
    return kru, ref


def assert_layer_matches(kru, ref, x, *, out_tol: float, grad_tol: float, scaled: bool = False):
    """``kru``'s output on ``x`` and every parameter's gradient (of the output's sum) equal
    ``ref``'s, to ``rtol = atol = out_tol`` / ``grad_tol``; with ``scaled``, the gradients
    over ``max(1, max |ref's|)``."""
    out, _ = kru(x)
    out_ref, _ = ref(x)
    torch.testing.assert_close(out, out_ref, rtol=out_tol, atol=out_tol)
    torch.view_as_real(out).sum().backward()
    torch.view_as_real(out_ref).sum().backward()
    for (name, p), q in zip(kru.named_parameters(), ref.parameters(), strict=True):
        scale = max(1.0, float(q.grad.abs().max())) if scaled else 1.0
        torch.testing.assert_close(
            p.grad / scale, q.grad / scale, rtol=grad_tol, atol=grad_tol, msg=name
        )


@interpreted
def test_kru_layer_uses_the_triton_plan_and_matches_eager():
    kru, ref = kru_and_eager_twin(3, 64, "triton", dtype=torch.float64)
    assert kru.resolved_backend() == "triton"
    plan = kru.plan(4, backend="triton")
    assert plan.strategy == "merged" and len(plan.groups) <= triton_backend.SLOTS
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    assert_layer_matches(kru, ref, x, out_tol=1e-10, grad_tol=1e-9)


@interpreted
def test_uncovered_shape_falls_back_to_eager_with_one_log_line(monkeypatch, caplog):
    # A register budget too small for this shape: the registry runs eager and says so once.
    monkeypatch.setattr(triton_backend, "MAX_STATE", 4)
    u, h0, mats, bias, _ = _inputs([(3, 3), (5, 5)], torch.complex128, 3, 2, "modrelu")
    assert triton_backend.tile_config([(3, 3), (5, 5)], torch.complex128, 2) is None
    with caplog.at_level(logging.INFO, logger="kru_core.recurrence"):
        a = run_recurrence(u, h0, mats, activation="modrelu", bias=bias, backend="triton")
        b = run_recurrence(u, h0, mats, activation="modrelu", bias=bias, backend="triton")
    ref = run_recurrence(u, h0, mats, activation="modrelu", bias=bias, backend="eager")
    assert torch.equal(a, ref) and torch.equal(b, ref)
    lines = [r for r in caplog.records if "recurrence backend 'triton' unavailable" in r.message]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING


def test_cuda_tiles_spread_the_batch_over_the_sms_within_the_register_budget(monkeypatch):
    # Pure planning (no GPU needed): 132 SMs, as an H100/H200.
    monkeypatch.setattr(triton_backend, "_sm_count", lambda device: 132)
    cfg = triton_backend.tile_config([(16, 16), (32, 32)], torch.complex64, 128, "cuda")
    assert (cfg.rows, cfg.num_warps, cfg.dot) == (1, 8, (False, True, True))
    assert triton_backend.tile_config([(16, 16), (32, 32)], torch.float32, 1024, "cuda").rows == 2
    assert triton_backend.tile_config([(2, 2), (2, 2)], torch.float32, 4096, "cuda").rows == 16


@interpreted
def test_tile_config_pads_odd_factors_and_picks_dot_only_where_it_applies():
    cfg = triton_backend.tile_config([(3, 3), (5, 5)], torch.float32, 19)
    assert cfg.present == (False, True, True)
    assert cfg.padded == ((1, 1), (4, 4), (8, 8)) and cfg.rows == 16
    assert cfg.dot == (False, False, False) and cfg.square
    big = triton_backend.tile_config([(16, 16), (32, 32)], torch.float32, 128)
    assert big.dot == (False, True, True)
    assert triton_backend.tile_config([(16, 16), (32, 32)], torch.float64, 128).dot == (
        False,
        False,
        False,
    )
    assert not triton_backend.tile_config([(2, 3), (3, 2)], torch.float64, 4).square
    assert triton_backend.tile_config([(2, 2)] * 4, torch.float64, 4) is None  # > 3 slots


# --------------------------------------------------------------------------- CUDA


# Each case compiles two kernels (seconds each): a few that cover the kernel's branches.
CUDA_CASES = [
    ([(16, 16), (32, 32)], 20, 128, "modrelu", torch.complex64),  # the N=512 plan, tl.dot
    ([(16, 16), (32, 32)], 20, 32, "tanh", torch.float32),
    ([(3, 3), (5, 5)], 5, 19, "modrelu", torch.complex64),  # odd, padded
    ([(2, 3), (3, 2), (2, 2)], 50, 3, "split_relu", torch.complex64),  # rectangular, long T
    ([(2, 2), (2, 2), (2, 2)], 7, 1, "modrelu", torch.complex128),  # float64 (no tl.dot)
    ([(2, 3), (3, 2)], 1, 1, "tanh", torch.float64),  # T = 1, batch 1
]


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize(("shapes", "steps", "batch", "activation", "dtype"), CUDA_CASES)
def test_triton_on_cuda_equals_eager(shapes, steps, batch, activation, dtype):
    assert_matches_eager(shapes, dtype, steps, batch, activation, device="cuda")


@pytest.mark.gpu
@needs_cuda
def test_kru_layer_on_cuda_runs_triton_and_matches_eager():
    kru, ref = kru_and_eager_twin(1, 512, "auto", device="cuda")
    assert kru.resolved_backend("cuda") == "triton"
    x = torch.randn(32, 30, 1, device="cuda")
    assert_layer_matches(kru, ref, x, out_tol=1e-4, grad_tol=1e-3, scaled=True)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.complex64, torch.float64])
def test_uncovered_shape_on_cuda_runs_eager_captured_in_a_cuda_graph(monkeypatch, caplog, dtype):
    monkeypatch.setattr(triton_backend, "MAX_STATE", 4)
    triton_backend._GRAPHS.clear()
    activation = "modrelu"
    with caplog.at_level(logging.WARNING, logger="kru_core.recurrence.triton_backend"):
        # Training (forward and backward graphs), twice: the second call replays.
        for _ in range(2):
            assert_matches_eager([(3, 3), (5, 5)], dtype, 6, 4, activation, device="cuda")
        u, h0, mats, bias, _ = _inputs([(3, 3), (5, 5)], dtype, 6, 4, activation)
        u, h0, bias = u.detach().cuda(), h0.detach().cuda(), bias.detach().cuda()
        mats = [m.detach().cuda() for m in mats]
        with torch.no_grad():  # inference: one CUDAGraph
            out = run_recurrence(u, h0, mats, activation=activation, bias=bias, backend="triton")
            ref = run_recurrence(u, h0, mats, activation=activation, bias=bias, backend="eager")
        torch.testing.assert_close(out, ref, **TOL[dtype])
    assert len(triton_backend._GRAPHS) == 2
    assert any("captured in a CUDA graph" in r.message for r in caplog.records)

"""Every recurrence backend against the eager one, the switch, dtype-following and fallbacks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app.cli import apply_set_overrides
from kru_core import KLSTM, KRU, JobConfig, SequenceModel, train
from kru_core.checkpoint import load_checkpoint
from kru_core.config import BACKENDS as CONFIG_BACKENDS
from kru_core.config import ConfigError
from kru_core.kru import random_unitary_
from kru_core.recurrence import BACKENDS, backend_status, cpu, run_recurrence
from kru_core.training import build_model

REPO = Path(__file__).resolve().parents[2]
#: The compiled backends this machine can run (building the CPU operator once per machine).
COMPILED = [b for b in ("cpu", "triton") if backend_status(b) is None]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cpu_backend_builds_where_a_compiler_exists():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine")
    assert backend_status("cpu") is None
    assert cpu.library_path().exists()


def _inputs(shapes, dtype, steps, batch, activation, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = 1
    for p, _ in shapes:
        n *= p
    real = dtype.to_real() if dtype.is_complex else dtype

    def rand(*shape):
        if dtype.is_complex:
            return torch.complex(
                torch.randn(*shape, generator=gen, dtype=real),
                torch.randn(*shape, generator=gen, dtype=real),
            )
        return torch.randn(*shape, generator=gen, dtype=real)

    u = rand(steps, batch, n).requires_grad_()
    h0 = rand(batch, n).requires_grad_()
    # Unitary factors (orthonormal rows or columns if rectangular), so that long sequences
    # neither blow up nor vanish; a little noise so that they are not exactly unitary, scaled
    # back to spectral norm <= 1: with norms above 1, the gradients of 300 steps overflowed
    # float32 for some draws, in every backend alike (the draw came from the global generator,
    # so it depended on which tests ran before).
    mats = []
    for p, q in shapes:
        w = random_unitary_(torch.empty(p, q, dtype=dtype), gen) + 0.05 * rand(p, q)
        w = w / torch.linalg.matrix_norm(w, ord=2).clamp_min(1.0)
        mats.append(w.requires_grad_())
    bias = None
    if activation == "modrelu":
        bias = (-0.5 * torch.rand(n, generator=gen, dtype=real)).requires_grad_()
    weights = torch.randn(steps, batch, n, 2 if dtype.is_complex else 1, generator=gen, dtype=real)
    return u, h0, mats, bias, weights


def _run(backend, u, h0, mats, bias, weights, activation):
    out = run_recurrence(u, h0, mats, activation=activation, bias=bias, backend=backend)
    parts = torch.view_as_real(out) if out.is_complex() else out.unsqueeze(-1)
    loss = (parts * weights).sum() + parts[-1].pow(2).sum()
    wrt = [u, h0, *mats] + ([bias] if bias is not None else [])
    return out.detach(), torch.autograd.grad(loss, wrt)


CASES = [
    # (factor shapes, steps, batch)
    ([(2, 2), (2, 2), (2, 2)], 7, 3),
    ([(3, 3), (5, 5)], 5, 19),  # odd factors, a partial 8-row tile
    ([(2, 3), (3, 2)], 4, 16),  # rectangular
    ([(2, 3), (3, 2), (2, 2)], 1, 1),  # T = 1, batch 1
    ([(4, 4)], 3, 8),  # one (dense) matrix
    ([(2, 2), (2, 2)], 300, 2),  # long T
    ([(2, 2)] * 4, 6, 21),  # 2x2 butterflies over 8-row tiles, the last one partial
    ([(2, 2), (3, 3), (2, 2), (2, 2)], 4, 9),  # 2x2 pairs around an odd factor, 8-row tiles
    ([(2, 2)] * 5, 3, 12),  # two paired 2x2 passes and a single one, a partial tile
]


ACTIVATION_DTYPES = [
    ("modrelu", torch.complex128),
    ("split_relu", torch.complex128),
    ("identity", torch.complex128),
    ("modrelu", torch.float64),
    ("tanh", torch.float64),
    ("split_relu", torch.float64),
    ("modrelu", torch.complex64),
    ("tanh", torch.float32),
]
#: Under Triton's interpreter (numpy, ~17 s a case) the long sequence runs for one complex and
#: one real activation; every combination runs it on the compiled CPU backend and on CUDA.
LONG_T_INTERPRETED = {("modrelu", torch.complex128), ("tanh", torch.float64)}


def _equality_params():
    interpreted = not torch.cuda.is_available()
    for backend in COMPILED:
        for shapes, steps, batch in CASES:
            for activation, dtype in ACTIVATION_DTYPES:
                long_t = steps >= 100 and (activation, dtype) not in LONG_T_INTERPRETED
                if backend == "triton" and interpreted and long_t:
                    continue
                yield backend, shapes, steps, batch, activation, dtype


@pytest.mark.parametrize(
    ("backend", "shapes", "steps", "batch", "activation", "dtype"), list(_equality_params())
)
def test_backend_equals_eager_outputs_and_all_gradients(
    backend, shapes, steps, batch, activation, dtype
):
    args = _inputs(shapes, dtype, steps, batch, activation)
    out_e, grads_e = _run("eager", *args, activation)
    out_b, grads_b = _run(backend, *args, activation)
    tol = {"rtol": 1e-9, "atol": 1e-9} if dtype in (torch.float64, torch.complex128) else {}
    if dtype in (torch.float32, torch.complex64):
        tol = {"rtol": 1e-4, "atol": 1e-4}
    torch.testing.assert_close(out_b, out_e, **tol)
    names = ["u", "h0", *(f"mats[{k}]" for k in range(len(shapes))), "bias"]
    for name, gb, ge in zip(names, grads_b, grads_e, strict=False):
        scale = max(1.0, float(ge.abs().max()))
        torch.testing.assert_close(gb / scale, ge / scale, **tol, msg=name)


@pytest.mark.parametrize("backend", COMPILED)
@pytest.mark.parametrize("activation", ["modrelu", "split_relu", "identity"])
def test_gradcheck_complex128(backend, activation):
    torch.manual_seed(0)
    u, h0, mats, bias, _ = _inputs([(2, 3), (3, 2)], torch.complex128, 3, 2, activation)

    def fn(u, h0, *rest):
        b = rest[-1] if bias is not None else None
        ms = list(rest[:-1] if bias is not None else rest)
        return run_recurrence(u, h0, ms, activation=activation, bias=b, backend=backend)

    inputs = (u, h0, *mats) + ((bias,) if bias is not None else ())
    assert torch.autograd.gradcheck(fn, inputs, fast_mode=True)


@pytest.mark.parametrize("backend", ["eager", *COMPILED])
def test_kru_layer_matches_dense_oracle_for_every_backend(backend):
    torch.manual_seed(1)
    kru = KRU(3, 12, factors=[(2, 3), (3, 2), (2, 2)], backend=backend, dtype=torch.float64)
    x = torch.randn(17, 6, 3, dtype=torch.float64)  # batch 17: a full and a partial tile
    w = kru.recurrent_matrix().detach()
    u = kru.input_projection(x.transpose(0, 1)).detach()
    h = torch.zeros(17, 12, dtype=kru.state_dtype)
    b = kru.bias.detach().clamp(max=0)
    expected = []
    for t in range(6):
        z = h @ w.T + u[t]
        h = z * torch.relu(z.abs() + b) / (z.abs() + 1e-5)
        expected.append(h)
    with torch.no_grad():
        out, _ = kru(x)
    torch.testing.assert_close(out, torch.stack(expected, 1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_name_runs_kru_kruc_cell_klstm_and_sequence_model(backend):
    x = torch.randn(2, 4, 3)
    ref = KRU(3, 8, backend="eager")
    kru = KRU(3, 8, backend=backend)
    kru.load_state_dict(ref.state_dict())
    torch.testing.assert_close(kru(x)[0], ref(x)[0], rtol=1e-5, atol=1e-5)
    lstm_ref = KLSTM(3, 8)
    lstm = KLSTM(3, 8, backend=backend)
    lstm.load_state_dict(lstm_ref.state_dict())
    torch.testing.assert_close(lstm(x)[0], lstm_ref(x)[0])
    model = SequenceModel(cell="kru", input_size=3, hidden_size=8, output_size=2, backend=backend)
    assert model(x)[0].shape == (2, 4, 2)


def test_unknown_backend_is_refused_everywhere():
    with pytest.raises(ValueError, match="backend"):
        KRU(3, 8, backend="gpu")
    with pytest.raises(ValueError, match="backend"):
        SequenceModel(cell="kru", input_size=3, hidden_size=8, output_size=2, backend="fast")
    with pytest.raises(ConfigError) as err:
        JobConfig.from_dict({"model": {"backend": "gpu"}})
    assert err.value.field == "model.backend"
    assert CONFIG_BACKENDS == BACKENDS


def test_set_override_reaches_the_model_backend():
    data = apply_set_overrides({"model": {"hidden_size": 16}}, ["model.backend=eager"])
    assert JobConfig.from_dict(data).model.backend == "eager"


@pytest.mark.parametrize("backend", ["eager", *COMPILED])
def test_state_dtype_follows_double_half_and_to(backend):
    # Issue 9 item 5: the state dtype was fixed at construction, so .double() broke forward.
    kru = KRU(3, 15, factors=[3, 5], complex=False, backend=backend).double()
    out, _ = kru(torch.randn(2, 4, 3, dtype=torch.float64))
    assert out.dtype == torch.float64
    ckru = KRU(3, 16, backend=backend).double()
    assert ckru.state_dtype == torch.complex128 and ckru.bias.dtype == torch.float64
    out, _ = ckru(torch.randn(2, 4, 3, dtype=torch.float64))
    assert out.dtype == torch.complex128
    out.real.sum().backward()
    assert all(p.grad is not None for p in ckru.parameters())
    back = ckru.float().to("cpu")
    assert back.state_dtype == torch.complex64 and back(torch.randn(2, 4, 3))[0].dtype == (
        torch.complex64
    )
    half = KRU(3, 8, complex=False, backend=backend).half()  # eager in half (no compiled half)
    assert half(torch.randn(2, 4, 3).half())[0].dtype == torch.float16
    model = SequenceModel(cell="kru", input_size=1, hidden_size=8, output_size=3, backend=backend)
    logits, _ = model.double()(torch.rand(2, 5, 1, dtype=torch.float64))
    assert logits.dtype == torch.float64


@pytest.mark.parametrize("backend", COMPILED)
def test_checkpoint_trained_with_eager_predicts_the_same_with_another_backend(backend, tmp_path):
    cfg = JobConfig.from_dict(
        {
            "task": {"kind": "copy", "delay": 5, "eval_size": 8},
            "model": {"cell": "kru", "hidden_size": 16, "backend": "eager"},
            "train": {"steps": 3, "batch_size": 8, "eval_every": 3, "checkpoint_every": 3},
        }
    )
    result = train(cfg, out_dir=tmp_path)
    ckpt = load_checkpoint(result.checkpoint, train_state=False)
    outputs = {}
    x = torch.randint(0, ckpt.task_info.vocab_size, (3, 12))
    for name in ("eager", backend):
        model_cfg = JobConfig.from_dict(
            {**ckpt.config.to_dict(), "model": {**ckpt.config.to_dict()["model"], "backend": name}}
        ).model
        model = build_model(model_cfg, ckpt.task_info)
        model.load_state_dict(ckpt.model_state)
        with torch.inference_mode():
            outputs[name] = model(x)[0]
        assert model.rnn.resolved_backend() == name
    torch.testing.assert_close(outputs[backend], outputs["eager"], rtol=1e-4, atol=1e-4)


def test_missing_compiler_falls_back_to_eager_with_one_log_line(tmp_path):
    # A fresh cache directory and a compiler that does not exist: the build fails, the layer
    # runs eager, and says so once (in a separate process: this one has the operator loaded).
    script = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s %(message)s')\n"
        "from kru_core import KRU\n"
        "torch.manual_seed(0)\n"
        "kru = KRU(2, 8, backend='cpu')\n"
        "x = torch.randn(3, 4, 2)\n"
        "a = kru(x)[0]; b = kru(x)[0]\n"
        "kru.backend = 'eager'\n"
        "assert torch.equal(a, kru(x)[0]) and kru.resolved_backend() == 'eager'\n"
        "print('OK', kru.backend)\n"
    )
    env = {
        **os.environ,
        "KRU_EXTENSION_DIR": str(tmp_path / "ext"),
        "CXX": str(tmp_path / "no-such-compiler"),
        "PYTHONPATH": str(REPO),
    }
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if "recurrence backend 'cpu' unavailable" in ln]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("WARNING") and "using 'eager'" in lines[0]
    assert not (tmp_path / "ext" / cpu.library_name() / f"{cpu.library_name()}.so").exists()


def test_cpu_library_name_changes_with_the_source_and_flags():
    name = cpu.library_name()
    assert name.startswith("kru_recurrence_") and len(name) == len("kru_recurrence_") + 16
    assert json.dumps(list(cpu.CFLAGS))  # flags are plain strings, part of the hash


def test_every_runnable_level_has_its_own_library_and_the_generic_one_is_last():
    levels = cpu.runnable_levels()
    assert levels[-1] is None and cpu.CPU_LEVEL in levels
    names = {cpu.library_name(level) for level in levels}
    assert len(names) == len(levels)
    assert cpu.library_name() == cpu.library_name(cpu.CPU_LEVEL)


_LEVEL_SCRIPT = """
import torch
from kru_core.recurrence import backend_status, cpu
from tests.core.test_recurrence_backends import CASES, _inputs, _run
assert cpu.CPU_LEVEL is None and backend_status("cpu") is None, backend_status("cpu")
assert cpu.build() == cpu.library_path(None)
for shapes, steps, batch in CASES:
    for activation, dtype in (("modrelu", torch.complex64), ("tanh", torch.float64)):
        args = _inputs(shapes, dtype, steps, batch, activation)
        out_e, grads_e = _run("eager", *args, activation)
        out_c, grads_c = _run("cpu", *args, activation)
        tol = 1e-9 if dtype == torch.float64 else 1e-4
        torch.testing.assert_close(out_c, out_e, rtol=tol, atol=tol)
        for gc, ge in zip(grads_c, grads_e):
            scale = max(1.0, float(ge.abs().max()))
            torch.testing.assert_close(gc / scale, ge / scale, rtol=tol, atol=tol)
print("OK")
"""


def test_the_generic_build_equals_eager(tmp_path):
    """``KRU_CPU_LEVEL=generic``: the build without AVX (what an image serves to a CPU below its
    builder's level) runs the same operator: the vector-extension transposes lowered to SSE2."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine")
    env = {**os.environ, "KRU_CPU_LEVEL": "generic", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-c", _LEVEL_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


def test_without_a_compiler_a_cached_lower_level_build_is_loaded(tmp_path):
    """An image built on a machine of a lower level than the host's (only its builds cached, no
    compiler): the host loads the best cached one, with one log line, instead of eager."""
    if cpu.CPU_LEVEL is None:
        pytest.skip("this CPU runs only the generic build")
    generic = cpu.library_path(None)
    if not generic.exists():
        subprocess.run(
            [sys.executable, "-m", "kru_core.recurrence.cpu", "--level", "generic"],
            check=True,
            capture_output=True,
            cwd=REPO,
            timeout=300,
        )
    ext = tmp_path / "ext"
    shutil.copytree(generic.parent, ext / generic.parent.name)
    script = (
        "import logging, torch\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s %(message)s')\n"
        "from kru_core import KRU\n"
        "from kru_core.recurrence import backend_status, cpu\n"
        "assert backend_status('cpu') is None, backend_status('cpu')\n"
        "assert cpu.build() == cpu.library_path(None)\n"
        "kru = KRU(2, 16, backend='cpu')\n"
        "x = torch.randn(9, 4, 2)\n"
        "a = kru(x)[0]\n"
        "kru.backend = 'eager'\n"
        "torch.testing.assert_close(a, kru(x)[0], rtol=1e-5, atol=1e-5)\n"
        "print('OK')\n"
    )
    env = {
        **os.environ,
        "KRU_EXTENSION_DIR": str(ext),
        "CXX": str(tmp_path / "no-such-compiler"),
        "PYTHONPATH": str(REPO),
    }
    env.pop("KRU_CPU_LEVEL", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "OK" in proc.stdout
    lines = [ln for ln in proc.stderr.splitlines() if "could not be compiled for" in ln]
    assert len(lines) == 1 and lines[0].startswith("WARNING"), proc.stderr[-3000:]

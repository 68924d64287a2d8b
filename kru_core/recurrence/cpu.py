"""The ``"cpu"`` recurrence backend: one compiled C++ operator for the whole time loop.

``csrc/recurrence.cpp`` runs ``h_t = act(W h_{t-1} + u_t)`` for every step in one call (forward)
and its BPTT in another (backward), applying the plan's matrices to each batch row's state in a
small scratch buffer without materialising ``W`` (complex numbers as split real and imaginary
arrays, batch rows split over threads). It is registered with ``torch.library`` as
``torch.ops.kru.recurrence_forward`` / ``recurrence_backward`` and wrapped here in an autograd
Function.

Build: on first use the source is compiled with the system C++ compiler (``g++``, through
``torch.utils.cpp_extension`` and ``ninja``) into ``$KRU_EXTENSION_DIR`` (default
``~/.cache/kru/extensions``), in a directory named after a hash of the source, the flags and the
torch version; later processes load the cached library without compiling (no compiler needed
then: the Docker image builds it at image build time). ``python -m kru_core.recurrence.cpu``
builds it ahead of time. If it cannot be built the backend reports why and
:mod:`kru_core.recurrence` falls back to ``"eager"`` with one log line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..kron import KronPlan, plan_recurrence
from . import kernel_operands, needs_grad, register_backend

__all__ = ["build", "cache_dir", "cpu_recurrence", "cpu_supports", "library_path"]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "recurrence.cpp"


#: The x86-64 micro-architecture levels the operator is built for, best first, each with the
#: CPU flags it needs (``/proc/cpuinfo`` names).
ARCH_LEVELS = (
    ("x86-64-v4", {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}),
    ("x86-64-v3", {"avx2", "fma", "bmi2"}),
)


def _arch_flags() -> tuple[str, ...]:
    # The best level of ARCH_LEVELS that this CPU has: AVX-512 (v4; its 32 vector registers hold
    # the backward's factor-gradient accumulators without spilling: the backward 12% faster
    # than v3 at N=512, B=128; GCC still prefers 256-bit vectors at v4, so no clock penalty from
    # 512-bit ones), else AVX2 + FMA (v3). The flags are part of the library's name, so a CPU
    # without them never loads a library built with them (it builds its own, or falls back to
    # eager); no -march=native, which would tie a cached build to one CPU model.
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return ()
    return next(((f"-march={level}",) for level, need in ARCH_LEVELS if need <= flags), ())


# -fno-math-errno: sqrt (modReLU) vectorises (no errno to set; inputs are never negative).
# -fno-trapping-math: the activations' divisions and selects vectorise (without it GCC keeps a
# possibly trapping division under its condition, and the lane loop stays scalar: the modReLU
# was a third of the forward at N=512, B=128). Rounding is unchanged; nothing here reads the
# floating-point exception flags.
CFLAGS = (
    "-O3",
    "-fopenmp",
    "-fopenmp-simd",
    "-ffp-contract=fast",
    "-fno-math-errno",
    "-fno-trapping-math",
    *_arch_flags(),
)
LDFLAGS = ("-fopenmp",)
_ACTIVATION_CODES = {"modrelu": 0, "split_relu": 1, "tanh": 2, "identity": 3}
_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)
_LOCK = threading.Lock()
_LOADED: Path | None = None


def cache_dir() -> Path:
    """Where compiled libraries live: ``$KRU_EXTENSION_DIR`` or ``~/.cache/kru/extensions``."""
    env = os.environ.get("KRU_EXTENSION_DIR")
    return Path(env) if env else Path.home() / ".cache" / "kru" / "extensions"


def library_name() -> str:
    """``kru_recurrence_<hash>``: the hash of the source, flags, torch version and C++ ABI."""
    h = hashlib.sha256(SOURCE.read_bytes())
    abi = getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", "")
    for part in (*CFLAGS, *LDFLAGS, torch.__version__, str(abi), platform.machine()):
        h.update(b"\0" + str(part).encode())
    return f"kru_recurrence_{h.hexdigest()[:16]}"


def library_path() -> Path:
    """The compiled library's path (it may not exist yet)."""
    name = library_name()
    return cache_dir() / name / f"{name}.so"


def build(*, verbose: bool = False) -> Path:
    """Load the operator, compiling it first if this machine has no cached build; returns the
    library's path. Raises whatever the compiler raised if the build fails."""
    global _LOADED
    with _LOCK:
        if _LOADED is not None:
            return _LOADED
        path = library_path()
        if not path.exists():
            from torch.utils import cpp_extension

            path.parent.mkdir(parents=True, exist_ok=True)
            logger.info("compiling the CPU recurrence operator into %s (once per machine)", path)
            cpp_extension.load(
                name=path.stem,
                sources=[str(SOURCE)],
                extra_cflags=list(CFLAGS),
                extra_ldflags=list(LDFLAGS),
                build_directory=str(path.parent),
                is_python_module=False,
                verbose=verbose,
            )
        else:
            torch.ops.load_library(str(path))
        _LOADED = path
        return path


def _available() -> str | None:
    try:
        build()
    except Exception as exc:  # a missing compiler, a failed build, a broken cached library
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return f"the C++ operator could not be built ({type(exc).__name__}: {first[:200]})"
    return None


def cpu_supports(u: Tensor, h0: Tensor, mats: Sequence[Tensor], activation: str) -> bool:
    """CPU tensors of one of float32, float64, complex64, complex128, with 2-d matrices."""
    return (
        u.device.type == "cpu"
        and u.dtype in _DTYPES
        and h0.dtype == u.dtype
        and activation in _ACTIVATION_CODES
        and all(m.dim() == 2 and m.dtype == u.dtype and m.device.type == "cpu" for m in mats)
    )


class _CpuRecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, code: int, u: Tensor, h0: Tensor, bias: Tensor | None, *mats: Tensor):  # type: ignore[override]
        out = torch.ops.kru.recurrence_forward(u, h0, list(mats), bias, code)
        ctx.code = code
        ctx.save_for_backward(u, h0, bias, out, *mats)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor):  # type: ignore[override]
        u, h0, bias, out, *mats = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_mats = any(need[4:])
        grad_u, grad_h0, grad_bias, *grad_mats = torch.ops.kru.recurrence_backward(
            grad_out.resolve_conj().resolve_neg(), out, u, h0, mats, bias, ctx.code, need_mats
        )
        return (
            None,
            grad_u if need[1] else None,
            grad_h0 if need[2] else None,
            grad_bias if (need[3] and bias is not None) else None,
            *(g if (need_mats and n) else None for g, n in zip(grad_mats, need[4:], strict=True)),
        )


def cpu_recurrence(
    u: Tensor, h0: Tensor, mats: Sequence[Tensor], *, activation: str, bias: Tensor | None
) -> Tensor:
    """All states ``(T, B, N)`` by the compiled operator (differentiable; see the module)."""
    code = _ACTIVATION_CODES[activation]
    u, h0, mats, bias = kernel_operands(u, h0, mats, bias if activation == "modrelu" else None)
    if not needs_grad(u, h0, mats, bias):
        return torch.ops.kru.recurrence_forward(u, h0, mats, bias, code)
    return _CpuRecurrence.apply(code, u, h0, bias, *mats)


def cpu_plan(shapes: Sequence[tuple[int, int]], batch_size: int, device: torch.device) -> KronPlan:
    """The plan the compiled operator runs fastest (``docs/benchmarks.md``): the original
    factors when they are all 2x2 (the operator's butterfly passes beat every merge and the
    dense matrix at every batch size measured, 1 to 128, N=128 to 1024); otherwise the original
    factors once the batch fills an 8-row tile (every factor's inner loop then runs over the
    tile), the default merge for smaller batches (one row: longer inner loops)."""
    all_2x2 = all(tuple(s) == (2, 2) for s in shapes)
    strategy = "factored" if all_2x2 or batch_size >= 8 else "merged"
    return plan_recurrence(shapes, batch_size=batch_size, device=device, strategy=strategy)


register_backend("cpu", cpu_recurrence, available=_available, supports=cpu_supports, plan=cpu_plan)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(build(verbose=True))

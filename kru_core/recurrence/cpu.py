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
builds it ahead of time (``--all-levels``: also for every lower instruction-set level, as the
Docker image does, so that an image built on an AVX-512 machine runs compiled on an AVX2 one).
If it cannot be built the backend reports why and :mod:`kru_core.recurrence` falls back to
``"eager"`` with one log line.
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

__all__ = [
    "build",
    "cache_dir",
    "cpu_level",
    "cpu_recurrence",
    "cpu_supports",
    "library_path",
    "runnable_levels",
]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("csrc") / "recurrence.cpp"


#: The x86-64 micro-architecture levels the operator is built for, best first, each with the
#: CPU flags it needs (``/proc/cpuinfo`` names); a CPU with neither gets a generic build.
ARCH_LEVELS = (
    ("x86-64-v4", frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"})),
    ("x86-64-v3", frozenset({"avx2", "fma", "bmi2"})),
)


def _detected_level() -> str | None:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return None
    return next((level for level, need in ARCH_LEVELS if need <= flags), None)


def runnable_levels() -> list[str | None]:
    """Every level this CPU runs, best first, ending with the generic build (``None``): what
    ``python -m kru_core.recurrence.cpu --all-levels`` builds, so that an image built here also
    serves CPUs of a lower level."""
    mine = _detected_level()
    names = [level for level, _ in ARCH_LEVELS]
    return [*(names[names.index(mine) :] if mine in names else []), None]


def cpu_level() -> str | None:
    """The level of :data:`ARCH_LEVELS` whose build this process loads (``None``: generic):
    ``$KRU_CPU_LEVEL`` if set to one of :func:`runnable_levels` (a name, or ``generic``), else
    the best this CPU runs.

    AVX-512 (v4; its 32 vector registers hold the backward's factor-gradient accumulators
    without spilling: the backward 12% faster than v3 at N=512, B=128; GCC still prefers 256-bit
    vectors at v4, so no clock penalty from 512-bit ones), else AVX2 + FMA (v3). The level is part
    of the library's name, so a CPU without it never loads a library built for it; no
    ``-march=native``, which would tie a cached build to one CPU model."""
    want = os.environ.get("KRU_CPU_LEVEL", "").strip()
    if not want:
        return _detected_level()
    level = None if want == "generic" else want
    if level in runnable_levels():
        return level
    choices = [lv or "generic" for lv in runnable_levels()]
    logger.warning("KRU_CPU_LEVEL=%s ignored: this CPU runs %s", want, choices)
    return _detected_level()


def cflags(level: str | None) -> tuple[str, ...]:
    """The compiler flags of a build for ``level`` (see :data:`CFLAGS`)."""
    return (*BASE_CFLAGS, *((f"-march={level}",) if level else ()))


# -fno-math-errno: sqrt (modReLU) vectorises (no errno to set; inputs are never negative).
# -fno-trapping-math: the activations' divisions and selects vectorise (without it GCC keeps a
# possibly trapping division under its condition, and the lane loop stays scalar: the modReLU
# was a third of the forward at N=512, B=128). Rounding is unchanged; nothing here reads the
# floating-point exception flags.
BASE_CFLAGS = (
    "-O3",
    "-fopenmp",
    "-fopenmp-simd",
    "-ffp-contract=fast",
    "-fno-math-errno",
    "-fno-trapping-math",
)
#: This CPU's level, and the flags of the build it loads.
CPU_LEVEL = cpu_level()
CFLAGS = cflags(CPU_LEVEL)
LDFLAGS = ("-fopenmp",)
_ACTIVATION_CODES = {"modrelu": 0, "split_relu": 1, "tanh": 2, "identity": 3}
_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)
_LOCK = threading.Lock()
_LOADED: Path | None = None  # the library this process loaded,
_LOADED_LEVEL: str | None = None  # for a build() of this level


def cache_dir() -> Path:
    """Where compiled libraries live: ``$KRU_EXTENSION_DIR`` or ``~/.cache/kru/extensions``."""
    env = os.environ.get("KRU_EXTENSION_DIR")
    return Path(env) if env else Path.home() / ".cache" / "kru" / "extensions"


def library_name(level: str | None = CPU_LEVEL) -> str:
    """``kru_recurrence_<hash>``: the hash of the source, flags (of a build for ``level``, by
    default this CPU's), torch version and C++ ABI."""
    h = hashlib.sha256(SOURCE.read_bytes())
    abi = getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", "")
    for part in (*cflags(level), *LDFLAGS, torch.__version__, str(abi), platform.machine()):
        h.update(b"\0" + str(part).encode())
    return f"kru_recurrence_{h.hexdigest()[:16]}"


def library_path(level: str | None = CPU_LEVEL) -> Path:
    """The compiled library's path for ``level`` (by default this CPU's; it may not exist)."""
    name = library_name(level)
    return cache_dir() / name / f"{name}.so"


def _compile(path: Path, level: str | None, verbose: bool) -> None:
    from torch.utils import cpp_extension

    path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("compiling the CPU recurrence operator into %s (once per machine)", path)
    cpp_extension.load(
        name=path.stem,
        sources=[str(SOURCE)],
        extra_cflags=list(cflags(level)),
        extra_ldflags=list(LDFLAGS),
        build_directory=str(path.parent),
        is_python_module=False,
        verbose=verbose,
    )


def build(*, verbose: bool = False, level: str | None = CPU_LEVEL) -> Path:
    """Load the operator, compiling it first if this machine has no cached build; returns the
    library's path. Raises whatever the compiler raised if the build fails and no build of a
    lower level this CPU runs is cached (an image built on a machine of a lower level: its
    best build is loaded instead, with one log line).

    ``level`` builds (and loads) the library of another level of :func:`runnable_levels`
    instead of this CPU's; one process loads one library (they register the same operators)."""
    global _LOADED, _LOADED_LEVEL
    with _LOCK:
        if _LOADED is not None:
            if level != _LOADED_LEVEL:
                raise RuntimeError(f"this process already loaded {_LOADED}")
            return _LOADED
        path = library_path(level)
        if path.exists():
            torch.ops.load_library(str(path))
        else:
            try:
                _compile(path, level, verbose)
            except Exception:
                levels = runnable_levels()
                lower = levels[levels.index(level) + 1 :] if level in levels else []
                cached = [library_path(lv) for lv in lower if library_path(lv).exists()]
                if not cached:
                    raise
                path = cached[0]
                logger.warning(
                    "the CPU recurrence operator could not be compiled for %s; loading %s",
                    level or "generic",
                    path,
                )
                torch.ops.load_library(str(path))
        _LOADED, _LOADED_LEVEL = path, level
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


def _main(argv: Sequence[str] | None = None) -> None:
    import argparse
    import subprocess
    import sys

    parser = argparse.ArgumentParser(
        prog="python -m kru_core.recurrence.cpu",
        description="Build (or find) the compiled CPU recurrence operator and print its path.",
    )
    parser.add_argument(
        "--all-levels",
        action="store_true",
        help="build every instruction-set level this CPU runs (for images that other CPUs run)",
    )
    parser.add_argument("--level", help="build this level (an ARCH_LEVELS name, or 'generic')")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.all_levels:
        # one process per level: a process loads one library (they register the same operators)
        for level in runnable_levels():
            cmd = [sys.executable, "-m", "kru_core.recurrence.cpu", "--level", level or "generic"]
            subprocess.run(cmd, check=True)
        return
    level = CPU_LEVEL if args.level is None else (None if args.level == "generic" else args.level)
    if level not in runnable_levels():
        parser.error(f"--level: this CPU runs {[lv or 'generic' for lv in runnable_levels()]}")
    print(build(verbose=True, level=level))


if __name__ == "__main__":
    _main()

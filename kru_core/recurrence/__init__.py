"""The KRU recurrence ``h_t = act(W h_{t-1} + u_t)`` over a whole sequence, behind one switch.

One entry point, :func:`run_recurrence`, runs the time loop with one of the registered
backends:

* ``"eager"``: the loop in PyTorch ops (:mod:`kru_core.recurrence.eager`), the reference;
* ``"cpu"``: a compiled C++ operator (:mod:`kru_core.recurrence.cpu`; forward and BPTT backward of
  the whole sequence in one call each), built with the system C++ compiler on first use and
  cached per machine;
* ``"triton"``: a persistent Triton GPU kernel (``kru_core/recurrence/triton_backend.py``), when
  the ``triton`` package and that module are present;
* ``"auto"``: the fastest measured backend for the device (``docs/benchmarks.md``): ``"cpu"`` on
  the CPU, ``"triton"`` on CUDA, each when it is available, else ``"eager"``.

A backend that is unavailable (no compiler, no ``triton``) or that does not cover a call (its
dtype, activation or shape) falls back to ``"eager"`` with one log line per reason (a WARNING
when that backend was asked for by name, INFO under ``"auto"``), never an error: a model and its
checkpoints do not depend on the backend, so the result is the same up to rounding. Only a name
outside :data:`BACKENDS` is an error (``ValueError``).

Example::

    >>> u = torch.randn(10, 4, 8, dtype=torch.complex64)        # (T, B, N) input term
    >>> h0 = torch.zeros(4, 8, dtype=torch.complex64)
    >>> mats = [torch.eye(2, dtype=torch.complex64)] * 3          # W = I (2x2)^{x3}
    >>> run_recurrence(u, h0, mats, activation="identity", bias=None, backend="eager").shape
    torch.Size([10, 4, 8])
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..kron import KronPlan
from .eager import eager_recurrence

__all__ = [
    "BACKENDS",
    "backend_status",
    "check_backend",
    "fallback_to_eager",
    "kernel_operands",
    "needs_grad",
    "preferred_plan",
    "register_backend",
    "resolve_backend",
    "run_recurrence",
]

logger = logging.getLogger(__name__)

#: Names accepted by ``backend=`` (layers, :class:`~kru_core.models.SequenceModel`, the job
#: config's ``model.backend``).
BACKENDS = ("auto", "eager", "cpu", "triton")

#: ``fn(u, h0, mats, *, activation, bias) -> (T, B, N)`` states.
RecurrenceFn = Callable[..., Tensor]
#: ``supports(u, h0, mats, activation) -> bool``: whether a backend covers a call.
SupportsFn = Callable[[Tensor, Tensor, Sequence[Tensor], str], bool]
#: ``plan(shapes, batch_size, device) -> KronPlan | None``: a backend's own ``"auto"`` plan.
PlanFn = Callable[[Sequence[tuple[int, int]], int, torch.device], KronPlan | None]


@dataclass
class _Backend:
    fn: RecurrenceFn
    available: Callable[[], str | None]
    supports: SupportsFn | None
    plan: PlanFn | None


_REGISTRY: dict[str, _Backend] = {}
_AVAILABILITY: dict[str, str | None] = {}
_LOGGED: set[tuple[str, str]] = set()
#: Modules that register a backend when imported (imported on first use, failures tolerated).
_PROVIDERS = {"cpu": ".cpu", "triton": ".triton_backend"}
_PROVIDER_ERRORS: dict[str, str] = {}


def register_backend(
    name: str,
    fn: RecurrenceFn,
    *,
    available: Callable[[], str | None] | None = None,
    supports: SupportsFn | None = None,
    plan: PlanFn | None = None,
) -> None:
    """Register (or replace) backend ``name``.

    Args:
        name: one of :data:`BACKENDS` other than ``"auto"``.
        fn: ``fn(u, h0, mats, *, activation, bias)``, all states ``(T, B, N)``, differentiable
            with respect to ``u``, ``h0``, ``mats`` and ``bias`` when gradients are enabled.
        available: returns ``None`` when the backend can run on this machine, else the reason
            (called once per process, on the first call that would use it; may build things).
        supports: whether the backend covers one call (dtype, activation, shapes, device);
            ``None``: every call.
        plan: the :class:`~kru_core.kron.KronPlan` this backend runs fastest for factor shapes,
            a batch size and a device, used by the layers under ``strategy="auto"``; ``None``
            (or returning ``None``): :func:`~kru_core.kron.plan_recurrence`'s rule.
    """
    if name not in BACKENDS or name == "auto":
        raise ValueError(f"backend: expected one of {BACKENDS[1:]}, got {name!r}")
    _REGISTRY[name] = _Backend(fn, available or (lambda: None), supports, plan)
    _AVAILABILITY.pop(name, None)


register_backend(
    "eager",
    lambda u, h0, mats, *, activation, bias: eager_recurrence(
        u, h0, mats, activation=activation, bias=bias
    ),
)


def _load_provider(name: str) -> None:
    if name in _REGISTRY or name in _PROVIDER_ERRORS or name not in _PROVIDERS:
        return
    try:
        module = importlib.import_module(_PROVIDERS[name], __name__)
    except Exception as exc:  # ImportError (no triton), or a broken optional module
        _PROVIDER_ERRORS[name] = f"{type(exc).__name__}: {exc}"
        return
    if name not in _REGISTRY and name == "triton":
        # The Triton module exposes its functions; register them if it did not itself.
        fn = getattr(module, "triton_recurrence", None)
        supports = getattr(module, "triton_supports", None)
        if fn is None:
            _PROVIDER_ERRORS[name] = "kru_core.recurrence.triton_backend has no triton_recurrence"
            return
        register_backend("triton", fn, supports=supports)


def backend_status(name: str) -> str | None:
    """``None`` if backend ``name`` can run here, else why not (cached for the process; the
    first call for ``"cpu"`` may compile the operator)."""
    check_backend(name)
    if name == "auto":
        return None
    _load_provider(name)
    if name not in _REGISTRY:
        return _PROVIDER_ERRORS.get(name, f"backend {name!r} is not registered")
    if name not in _AVAILABILITY:
        try:
            _AVAILABILITY[name] = _REGISTRY[name].available()
        except Exception as exc:
            _AVAILABILITY[name] = f"{type(exc).__name__}: {exc}"
    return _AVAILABILITY[name]


def check_backend(name: object) -> str:
    """Return ``name`` if it is one of :data:`BACKENDS`, else raise ``ValueError``."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {name!r}")
    return name


def fallback_to_eager(requested: str, backend: str, reason: str) -> str:
    """Log (once per ``backend`` and ``reason``) that ``backend`` is not used, and return
    ``"eager"``; a WARNING when ``requested`` names it, INFO under ``"auto"``."""
    key = (backend, reason)
    if key not in _LOGGED:
        _LOGGED.add(key)
        level = logging.INFO if requested == "auto" else logging.WARNING
        logger.log(level, "recurrence backend %r unavailable (%s); using 'eager'", backend, reason)
    return "eager"


def resolve_backend(name: str, device: torch.device | str | None = None) -> str:
    """The concrete backend (never ``"auto"``) that ``name`` means on ``device``.

    ``"auto"``: ``"cpu"`` on the CPU and ``"triton"`` on CUDA when available, else ``"eager"``.
    An unavailable backend resolves to ``"eager"`` (one log line per reason).
    """
    check_backend(name)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if name == "auto":
        candidate = {"cpu": "cpu", "cuda": "triton"}.get(dev.type)
        if candidate is None:
            return "eager"
    else:
        candidate = name
    if candidate == "eager":
        return "eager"
    reason = backend_status(candidate)
    if reason is not None:
        return fallback_to_eager(name, candidate, reason)
    return candidate


def preferred_plan(
    backend: str, shapes: Sequence[tuple[int, int]], batch_size: int, device: torch.device | str
) -> KronPlan | None:
    """The concrete ``backend``'s own ``"auto"`` plan for these factor shapes, or ``None`` (use
    :func:`~kru_core.kron.plan_recurrence`)."""
    _load_provider(backend)  # a plan may be asked for before any call resolved the backend
    spec = _REGISTRY.get(backend)
    if spec is None or spec.plan is None:
        return None
    return spec.plan(shapes, batch_size, torch.device(device))


def needs_grad(u: Tensor, h0: Tensor, mats: Sequence[Tensor], bias: Tensor | None) -> bool:
    """Whether a recurrence over these operands must be differentiable: gradients are enabled
    and one of them requires a gradient."""
    return torch.is_grad_enabled() and (
        u.requires_grad
        or h0.requires_grad
        or (bias is not None and bias.requires_grad)
        or any(m.requires_grad for m in mats)
    )


def kernel_operands(
    u: Tensor, h0: Tensor, mats: Sequence[Tensor], bias: Tensor | None
) -> tuple[Tensor, Tensor, list[Tensor], Tensor | None]:
    """The operands as a compiled backend reads them: each contiguous, and ``u``, ``h0`` and
    ``mats`` with any lazy conjugation resolved (``bias`` is real)."""
    u = u.resolve_conj().contiguous()
    h0 = h0.resolve_conj().contiguous()
    mats = [m.resolve_conj().contiguous() for m in mats]
    return u, h0, mats, None if bias is None else bias.contiguous()


def run_recurrence(
    u: Tensor,
    h0: Tensor,
    mats: Sequence[Tensor],
    *,
    activation: str,
    bias: Tensor | None,
    backend: str = "auto",
    fused: bool = True,
) -> Tensor:
    """All states of ``h_t = act(W h_{t-1} + u_t)``, ``(T, B, N)``.

    Args:
        u: ``(T, B, N)`` input term (``U x_t``, the additive bias included), real or complex.
        h0: ``(B, N)`` initial state, the dtype of ``u``.
        mats: the effective matrices of a :class:`~kru_core.kron.KronPlan` (``W`` is their
            Kronecker product in ``torch.kron`` order), the dtype of ``u``.
        activation: one of :data:`~kru_core.activations.ACTIVATIONS`.
        bias: modReLU's real ``(N,)`` bias, or ``None``.
        backend: one of :data:`BACKENDS` (see the module docstring).
        fused: ``False`` records every step with autograd (the eager reference loop, whatever
            ``backend`` says) when gradients are needed.

    Differentiable with respect to ``u``, ``h0``, ``mats`` and ``bias``.
    """
    name = resolve_backend(backend, u.device)
    if not fused and needs_grad(u, h0, mats, bias):
        return eager_recurrence(u, h0, mats, activation=activation, bias=bias, fused=False)
    if name != "eager":
        spec = _REGISTRY[name]
        if spec.supports is not None and not spec.supports(u, h0, mats, activation):
            name = fallback_to_eager(backend, name, _describe(u, mats, activation))
    if name == "eager":
        return eager_recurrence(u, h0, mats, activation=activation, bias=bias, fused=fused)
    return _REGISTRY[name].fn(u, h0, mats, activation=activation, bias=bias)


def _describe(u: Tensor, mats: Sequence[Tensor], activation: str) -> str:
    shapes = [tuple(m.shape) for m in mats]
    return (
        f"does not cover dtype {u.dtype} on {u.device.type}, activation {activation!r}, "
        f"factors {shapes}"
    )

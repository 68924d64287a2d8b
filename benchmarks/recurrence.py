"""Per-step time of the KRU recurrence, per backend, next to torch.nn.RNN and torch.nn.LSTM.

Everything a table compares runs in one process, interleaved repetition by repetition (every
module once per repetition, in turn) on the same input, so that machine noise hits all of them
alike; each cell is the median (or ``--stat min``) over repetitions, in µs per time step.

Parts (``--parts`` picks some; all but ``plans`` by default):

* ``regimes``: the three regimes of issue 9's table (pixel-MNIST training: N=512, B=32, T=100,
  input 1, forward+backward; wide batch: N=512, B=128, T=50, input 32, forward+backward; one
  predict request: N=128, B=1, T=100, input 32, forward under ``torch.inference_mode``);
  ``grid``: ``--sizes`` × ``--batches`` (T=``--steps``, input ``--input-size``), forward and
  forward+backward. The KRU is the library's default (complex64, 2×2 factors, modReLU,
  ``strategy="auto"``: each backend's own plan, printed) once per available backend (``eager``,
  ``cpu``; ``triton`` on CUDA). Forward+backward: forward, then backward of the sum of all
  outputs (real and imaginary parts), parameter gradients zeroed each time.
* ``mnist``: one whole pixel-MNIST training step of the paper's model, KRU N=512 (the library's
  default factors, modReLU) against the paper's baseline LSTM N=128, built by
  ``kru_core.training.build_model`` / ``build_optimizer`` for the MNIST task's shapes (batch 32,
  784 steps, input 1, 10 classes) and stepped as ``kru_core.training`` steps (forward, cross
  entropy + the unitary penalty, backward, gradient clipping, Adam step, constraint), on random
  pixels (the time does not depend on them), with freed memory kept in the process as
  ``kru_core.training.train`` keeps it (:mod:`kru_core.memory`; run last for that reason).
* ``heap`` (not in the default run): the ``mnist`` part in child processes with freed memory
  kept and with glibc's defaults (``KRU_RETAIN_HEAP=1`` / ``0``), alternated.
* ``predict``: the predict route's model time (what ``kru_predict_duration_seconds`` observes in
  ``app/routes/models.py``: ``Predictor.predict_async``, validation, micro-batching and the
  forward pass) for one 100-step sequence of 32 features on an N=128 KRU classifier, with the
  KRU backend ``eager`` (before issue 9) and ``auto``, in ms per request.
* ``op`` (not in the default run): the ``cpu`` backend's operator called directly, forward and
  backward at issue 9's two training shapes (``OP_SHAPES``), what the operator's own changes are
  measured by (run it at each commit, or with builds alternated).
* ``plans`` (not in the default run): the ``cpu`` backend's KRU under each execution strategy
  (``dense``, ``merged``, ``factored``) over the grid, the measurement behind its ``auto`` plan.

Usage::

    python benchmarks/recurrence.py                          # everything, about 10 min here
    python benchmarks/recurrence.py --parts regimes mnist predict   # without the grid
    python benchmarks/recurrence.py --parts grid --sizes 512 --batches 32
    python benchmarks/recurrence.py --parts mnist predict
    python benchmarks/recurrence.py --parts plans --sizes 128 512 --batches 1 32
    python benchmarks/recurrence.py --parts op --stat min --reps 15
    python benchmarks/recurrence.py --parts heap --mnist-reps 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kru_core import KRU
from kru_core.memory import RETAIN_HEAP_ENV, retain_freed_memory
from kru_core.recurrence import backend_status

#: (name, N, B, T, input size, mode) of issue 9's table.
REGIMES = (
    ("pixel-MNIST training", 512, 32, 100, 1, "fwd+bwd"),
    ("wide batch", 512, 128, 50, 32, "fwd+bwd"),
    ("one predict request", 128, 1, 100, 32, "fwd"),
)
MODES = ("fwd", "fwd+bwd")


def available_backends(device: torch.device) -> list[str]:
    """The backends that run here for ``device``: ``eager``, ``cpu`` if its operator builds
    (CPU), ``triton`` if it is importable (CUDA)."""
    names = ["eager"]
    if device.type == "cpu" and backend_status("cpu") is None:
        names.append("cpu")
    if device.type == "cuda" and backend_status("triton") is None:
        names.append("triton")
    return names


def _loss(out: torch.Tensor) -> torch.Tensor:
    return (torch.view_as_real(out) if out.is_complex() else out).sum()


def _timer(module: torch.nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    def fwd() -> None:
        with torch.inference_mode():
            module(x)

    def fwd_bwd() -> None:
        module.zero_grad(set_to_none=True)
        _loss(module(x)[0]).backward()

    return fwd if mode == "fwd" else fwd_bwd


def interleaved(
    fns: dict[str, Callable[[], Any]],
    *,
    reps: int,
    warmup: int,
    stat: Callable[[list[float]], float],
) -> dict[str, float]:
    """Seconds per call of each function (``stat`` over ``reps``), all of them called in turn
    in every repetition (after ``warmup`` untimed ones)."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for rep in range(warmup + reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if rep >= warmup:
                samples[name].append(elapsed)
    return {name: stat(v) for name, v in samples.items()}


def _print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |", flush=True)


def layer_rows(
    label: str,
    n: int,
    b: int,
    steps: int,
    input_size: int,
    modes: tuple[str, ...],
    backends: list[str],
    args: argparse.Namespace,
    stat: Callable[[list[float]], float],
) -> list[list[str]]:
    """One table row per mode: µs per step of every backend's KRU, nn.RNN and nn.LSTM, and the
    ratios KRU / nn.RNN."""
    x = torch.randn(b, steps, input_size)
    modules: dict[str, torch.nn.Module] = {
        "rnn": torch.nn.RNN(input_size, n, batch_first=True),
        "lstm": torch.nn.LSTM(input_size, n, batch_first=True),
    }
    plans = []
    for name in backends:
        kru = KRU(input_size, n, batch_first=True, backend=name)
        modules[name] = kru
        plan = kru.plan(b, backend=kru.resolved_backend())
        plans.append(f"{name}: {plan.strategy} {plan.groups}")
    rows = []
    for mode in modes:
        fns = {name: _timer(m, x, mode) for name, m in modules.items()}
        res = interleaved(fns, reps=args.reps, warmup=args.warmup, stat=stat)
        us = {name: 1e6 * v / steps for name, v in res.items()}
        rows.append(
            [
                label,
                f"N={n} B={b} T={steps} in={input_size}",
                mode,
                *(f"{us[name]:.1f}" for name in backends),
                f"{us['rnn']:.1f}",
                f"{us['lstm']:.1f}",
                *(f"**{us[name] / us['rnn']:.2f}**" for name in backends),
                "; ".join(plans),
            ]
        )
    return rows


def layer_header(backends: list[str]) -> list[str]:
    """The columns of :func:`layer_rows`' rows."""
    return [
        "regime",
        "shape",
        "mode",
        *(f"KRU {b}" for b in backends),
        "nn.RNN",
        "nn.LSTM",
        *(f"{b} / RNN" for b in backends),
        "KRU plan",
    ]


def run_regimes(args: argparse.Namespace, stat: Callable[[list[float]], float]) -> None:
    backends = available_backends(torch.device("cpu"))
    header = layer_header(backends)
    rows = []
    for label, n, b, steps, input_size, mode in REGIMES:
        rows += layer_rows(label, n, b, steps, input_size, (mode,), backends, args, stat)
    print(f"\nIssue 9's regimes (µs per step; ratio = KRU / nn.RNN of the same N, {args.stat}):")
    _print_table(header, rows)


def run_grid(args: argparse.Namespace, stat: Callable[[list[float]], float]) -> None:
    backends = available_backends(torch.device("cpu"))
    header = layer_header(backends)
    print(f"\nGrid (µs per step, {args.stat}):")
    _print_table(header, [])
    for n in args.sizes:
        for b in args.batches:
            for row in layer_rows(
                "grid", n, b, args.steps, args.input_size, MODES, backends, args, stat
            ):
                print("| " + " | ".join(row) + " |", flush=True)


def run_plans(args: argparse.Namespace, stat: Callable[[list[float]], float]) -> None:
    """The ``cpu`` backend under each execution strategy (the evidence for its ``auto`` plan,
    ``kru_core.recurrence.cpu.cpu_plan``), µs per step."""
    strategies = ("dense", "merged", "factored")
    header = ["N", "B", *(f"{s} {m}" for m in MODES for s in strategies)]
    rows = []
    for n in args.sizes:
        for b in args.batches:
            x = torch.randn(b, args.steps, args.input_size)
            kru = {
                s: KRU(args.input_size, n, batch_first=True, strategy=s, backend="cpu")
                for s in strategies
            }
            cells = []
            for mode in MODES:
                fns = {s: _timer(m, x, mode) for s, m in kru.items()}
                res = interleaved(fns, reps=args.reps, warmup=args.warmup, stat=stat)
                cells += [f"{1e6 * res[s] / args.steps:.1f}" for s in strategies]
            rows.append([str(n), str(b), *cells])
    print(f"\nThe cpu backend per execution strategy (µs per step, {args.stat}):")
    _print_table(header, rows)


def mnist_step_timers(batch_size: int = 32, steps: int = 784) -> dict[str, Callable[[], None]]:
    """One pixel-MNIST training step of the paper's KRU (N=512) and LSTM (N=128) models, as
    ``kru_core.training`` builds and steps them, on random pixels of MNIST's shapes."""
    import math

    import torch.nn.functional as F

    from kru_core import JobConfig
    from kru_core.tasks.mnist import mnist_task_info
    from kru_core.training import build_model, build_optimizer, learning_rates

    info = mnist_task_info()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch_size, steps, 1, generator=gen)
    y = torch.randint(0, 10, (batch_size,), generator=gen)
    timers = {}
    for cell, hidden in (("kru", 512), ("lstm", 128)):
        cfg = JobConfig.from_dict(
            {
                "task": {"kind": "mnist"},
                "model": {"cell": cell, "hidden_size": hidden},
                "train": {"batch_size": batch_size},
            }
        )
        model = build_model(cfg.model, info)
        tc = cfg.train
        optimizer = build_optimizer(model, tc, steps)

        def step(model=model, tc=tc, optimizer=optimizer) -> None:
            outputs, _ = model(x)
            loss = F.cross_entropy(outputs, y)
            if tc.unitary_penalty:
                loss = loss + tc.unitary_penalty * model.unitary_penalty()
            assert math.isfinite(loss.item())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if tc.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_grad_norm)
            rates = learning_rates(tc, 0, steps)
            for group in optimizer.param_groups:
                group["lr"] = rates[group["name"]]
            optimizer.step()
            model.constrain_()

        timers[f"{cell} N={hidden} ({model.rnn.__class__.__name__})"] = step
    return timers


def run_mnist(args: argparse.Namespace, stat: Callable[[list[float]], float]) -> None:
    retain_freed_memory()  # as kru_core.training.train runs its steps
    timers = mnist_step_timers()
    res = interleaved(timers, reps=args.mnist_reps, warmup=1, stat=stat)
    if args.json:
        print(json.dumps(res))
        return
    (kru, k), (lstm, v) = res.items()
    print(f"\nPixel-MNIST training step (batch 32, 784 steps; s per step, {args.stat}):")
    _print_table(
        [kru, lstm, "KRU / LSTM"],
        [[f"{k:.3f}", f"{v:.3f}", f"**{k / v:.2f}**"]],
    )


def run_heap(args: argparse.Namespace, stat: Callable[[list[float]], float]) -> None:
    """The MNIST step with freed memory kept (``KRU_RETAIN_HEAP=1``, what ``kru train`` does)
    and with glibc's defaults (``0``): child processes of this script's ``mnist`` part, the two
    settings alternated ``--mnist-reps`` times (a process cannot go back to glibc's defaults)."""
    settings = {"kept": "1", "glibc default": "0"}
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in settings}
    for _ in range(args.mnist_reps):
        for name, value in settings.items():
            cmd = [sys.executable, __file__, "--parts", "mnist", "--mnist-reps", "3", "--json"]
            cmd += ["--threads", str(args.threads), "--stat", args.stat]
            env = {**os.environ, RETAIN_HEAP_ENV: value}
            out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
            for model, seconds in json.loads(out.stdout.splitlines()[-1]).items():
                samples[name].setdefault(model, []).append(seconds)
    print(
        f"\nPixel-MNIST training step, freed memory kept or not (s per step, {args.stat} of "
        f"{args.mnist_reps} alternated processes):"
    )
    models = list(samples["kept"])
    rows = [[name, *(f"{stat(samples[name][m]):.3f}" for m in models)] for name in settings]
    rows.append(
        [
            "kept / default",
            *(
                f"**{stat(samples['kept'][m]) / stat(samples['glibc default'][m]):.2f}**"
                for m in models
            ),
        ]
    )
    _print_table(["glibc heap", *models], rows)


def predict_timers(hidden: int = 128, steps: int = 100, features: int = 32) -> dict[str, Any]:
    """``Predictor.predict_async`` of one sequence on an N=``hidden`` KRU classifier, per
    backend (``eager``: before issue 9, ``auto``); coroutine factories."""
    from app.predictor import Predictor
    from kru_core import JobConfig, SequenceModel
    from kru_core.inference import LoadedModel
    from kru_core.tasks import TaskInfo

    info = TaskInfo(
        task_kind="dataset",
        target_kind="classification",
        input_kind="features",
        output_size=10,
        per_step=False,
        input_size=features,
    )
    cfg = JobConfig.from_dict(
        {"task": {"kind": "dataset", "dataset_id": "bench"}, "model": {"hidden_size": hidden}}
    )
    torch.manual_seed(0)
    state = None
    loaded = {}
    for backend in ("eager", "auto"):
        model = SequenceModel(
            cell="kru",
            input_size=features,
            hidden_size=hidden,
            output_size=10,
            backend=backend,
        )
        if state is None:
            state = model.state_dict()
        model.load_state_dict(state)  # the same weights for both
        loaded[backend] = LoadedModel(model, task_info=info, config=cfg)
    predictor = Predictor(
        resolve=lambda model_id: Path(model_id),
        loader=lambda path: loaded[str(path)],
        cache_size=4,
    )
    sequence = torch.randn(steps, features).tolist()
    return {b: (lambda b=b: predictor.predict_async(b, [sequence])) for b in loaded}


def run_predict(args: argparse.Namespace, stat: Callable[[list[float]], float]) -> None:
    factories = predict_timers()

    async def main() -> dict[str, float]:
        samples: dict[str, list[float]] = {b: [] for b in factories}
        for rep in range(args.predict_reps + 5):
            for b, make in factories.items():
                start = time.perf_counter()
                await make()
                if rep >= 5:
                    samples[b].append(time.perf_counter() - start)
        return {b: stat(v) for b, v in samples.items()}

    res = asyncio.run(main())
    print(
        f"\nPredict route model time (Predictor.predict_async, one sequence of 100 steps × 32 "
        f"features, KRU N=128; ms per request, {args.stat} of {args.predict_reps}):"
    )
    _print_table(
        ["backend eager (before)", "backend auto (after)", "after / before"],
        [
            [
                f"{1e3 * res['eager']:.3f}",
                f"{1e3 * res['auto']:.3f}",
                f"{res['auto'] / res['eager']:.2f}",
            ]
        ],
    )


#: (N, B, T) of the ``op`` part: issue 9's two training regimes, the operator alone.
OP_SHAPES = ((512, 32, 100), (512, 128, 50))


def _op_timers(n: int, b: int, steps: int, gen: torch.Generator) -> dict[str, Callable[[], Any]]:
    """The operator's forward and backward on random inputs of one ``OP_SHAPES`` shape."""
    factors = n.bit_length() - 1  # n = 2**factors
    mats = [torch.randn(2, 2, dtype=torch.complex64, generator=gen) * 0.7 for _ in range(factors)]
    u = torch.randn(steps, b, n, dtype=torch.complex64, generator=gen)
    h0 = torch.zeros(b, n, dtype=torch.complex64)
    bias = torch.zeros(n)
    grad = torch.randn(steps, b, n, dtype=torch.complex64, generator=gen)
    out = torch.ops.kru.recurrence_forward(u, h0, mats, bias, 0)
    return {
        "fwd": lambda: torch.ops.kru.recurrence_forward(u, h0, mats, bias, 0),
        "bwd": lambda: torch.ops.kru.recurrence_backward(grad, out, u, h0, mats, bias, 0, True),
    }


def run_op(args: argparse.Namespace, stat: Callable[[list[float]], float]) -> None:
    """The ``cpu`` backend's operator called directly (``torch.ops.kru``): nine 2×2 factors at
    N=512 (the library's default, complex64 modReLU), forward and backward (all gradients) of
    whole sequences, µs per step; what the commits that change the operator are measured by."""
    from kru_core.recurrence import cpu

    if backend_status("cpu") is not None:
        print(f"\nop: the cpu backend is not available ({backend_status('cpu')})")
        return
    cpu.build()
    gen = torch.Generator().manual_seed(args.seed)
    rows = []
    for n, b, steps in OP_SHAPES:
        fns = _op_timers(n, b, steps, gen)
        res = interleaved(fns, reps=args.reps, warmup=args.warmup, stat=stat)
        rows.append([f"N={n} B={b} T={steps}", *(f"{1e6 * res[m] / steps:.1f}" for m in fns)])
    print(f"\nThe cpu operator alone (µs per step, {args.stat}):")
    _print_table(["shape", "fwd", "bwd"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=["regimes", "grid", "mnist", "predict", "plans", "op", "heap"],
        default=["regimes", "grid", "mnist", "predict"],
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--steps", type=int, default=50, help="grid: sequence length T")
    parser.add_argument("--input-size", type=int, default=32, help="grid: input size")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--mnist-reps", type=int, default=5)
    parser.add_argument("--predict-reps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--stat",
        choices=["median", "min"],
        default="median",
        help="statistic over repetitions; 'min' resists a busy machine",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="mnist: one JSON line (for heap)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    stat = min if args.stat == "min" else statistics.median
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, backends "
        f"{available_backends(torch.device('cpu'))}, {args.stat} of interleaved repetitions"
    )
    if "regimes" in args.parts:
        run_regimes(args, stat)
    if "grid" in args.parts:
        run_grid(args, stat)
    if "predict" in args.parts:
        run_predict(args, stat)
    if "plans" in args.parts:
        run_plans(args, stat)
    if "op" in args.parts:
        run_op(args, stat)
    if "heap" in args.parts:
        run_heap(args, stat)
    if "mnist" in args.parts:  # last: it keeps freed memory in the process from then on
        run_mnist(args, stat)


if __name__ == "__main__":
    main()

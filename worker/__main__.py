"""``python -m worker [--parent-pid PID]``: a worker process (what ``kru serve`` starts)."""

from __future__ import annotations

import argparse
import os
import sys

# Before torch is imported (see app.cli.use_passive_openmp): a worker shares its cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from worker.runner import run_worker


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__)
    parser.add_argument(
        "--parent-pid", type=int, default=None, help="stop when this process is gone"
    )
    args = parser.parse_args(argv)
    return run_worker(parent_pid=args.parent_pid)


if __name__ == "__main__":
    sys.exit(main())

"""Session store writes and reads, in-process: the job store's SQLite against Redis, same run.

One session per store, ``--writes`` chunks advanced one at a time (a 1 KB state, as a KRU N=128
session holds, and a 10-label answer), each followed by a read of the session; prints the
median milliseconds of both per store (``worker/session_store.py``; docs/benchmarks.md
"Serving").

Usage::

    python benchmarks/session_store.py                                # Redis on 127.0.0.1:6379/9
    python benchmarks/session_store.py --redis redis://host:6379/1 --writes 1000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker import schema
from worker.db import Store
from worker.session_store import RedisSessionStore, SessionStore, SqlSessionStore, Step


def measure(store: SessionStore, writes: int) -> tuple[float, float]:
    """Median ms of one conditional advance and of one read, over ``writes`` chunks."""
    session = store.create("m" * 32, ttl_seconds=60, max_sessions=1_000_000)
    advance, read = [], []
    for position in range(writes):
        step = Step(session.id, position, 1, 60, b"x" * 1024, "d", {"predictions": [0] * 10})
        start = time.perf_counter()
        assert store.advance_many([step]) == [True]
        advance.append(time.perf_counter() - start)
        start = time.perf_counter()
        store.get(session.id)
        read.append(time.perf_counter() - start)
    store.delete(session.id)
    return 1e3 * statistics.median(advance), 1e3 * statistics.median(read)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/9")
    parser.add_argument("--writes", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kru-sessions-") as tmp:
        db = Store(f"sqlite:///{Path(tmp) / 'kru.db'}")
        schema.prepare(db, upgrade_schema=True)
        stores: dict[str, SessionStore] = {
            "sqlite": SqlSessionStore(db),
            "redis": RedisSessionStore(args.redis),
        }
        print("| store | advance ms (median) | read ms (median) |")
        print("|---|---|---|")
        for name, store in stores.items():
            advance, read = measure(store, args.writes)
            print(f"| {name} | {advance:.3f} | {read:.3f} |")
            store.close()
        db.dispose()


if __name__ == "__main__":
    main()

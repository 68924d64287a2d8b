"""Every file that the code and the docs cite is in the repository (a clone stands alone)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
#: Top-level folders a citation names a file in (``docs/speed.md``, ``worker/jobs.py``, ...).
ROOTS = (
    "docs",
    "tests",
    "scripts",
    "benchmarks",
    "docker",
    "kru_core",
    "worker",
    "app",
    "kru_client",
)
CITED = re.compile(
    r"(?<![\w./-])((?:" + "|".join(ROOTS) + r")/[\w./-]*\w\.(?:md|py|sh|yml|cpp|html|js|css|png))"
)


def _tracked() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return [REPO / name for name in out if name.endswith((".py", ".md", ".yml", ".sh", ".toml"))]


def test_every_cited_file_exists() -> None:
    missing, checked = [], 0
    for path in _tracked():
        if not path.is_file():
            continue
        for match in CITED.finditer(path.read_text(errors="replace")):
            cited = match.group(1)
            if "*" in cited or "<" in cited:
                continue
            checked += 1
            if not (REPO / cited).exists():
                missing.append(f"{path.relative_to(REPO)}: {cited}")
    assert missing == []
    assert checked > 100, f"only {checked} citations found: is the pattern still right?"


def test_nothing_cites_outside_the_repository() -> None:
    outside = [
        str(path.relative_to(REPO))
        for path in _tracked()
        if path.is_file() and "../shared" in path.read_text(errors="replace")
    ]
    assert outside == [str(Path(__file__).relative_to(REPO))]

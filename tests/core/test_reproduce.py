"""benchmarks/reproduce.py: the generated blocks of the results file."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def load_script():
    spec = importlib.util.spec_from_file_location("reproduce", REPO / "benchmarks/reproduce.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module
    spec.loader.exec_module(module)
    return module


def test_named_blocks_replace_only_themselves(tmp_path: Path) -> None:
    reproduce = load_script()
    results = tmp_path / "results.md"
    results.write_text(
        "# Results\n\nintro\n\n<!-- reproduce:begin -->\nold\n<!-- reproduce:end -->\n\nafter\n"
    )

    def block(name: str | None, body: str) -> str:
        begin, end = reproduce.markers(name)
        return f"{begin}\n{body}\n{end}"

    reproduce.write_results(results, block("mnist", "mnist 1"), "mnist")
    reproduce.write_results(results, block(None, "tasks 2"))
    reproduce.write_results(results, block("mnist", "mnist 2"), "mnist")
    text = results.read_text()
    assert text == (
        "# Results\n\nintro\n\n<!-- reproduce:begin -->\ntasks 2\n<!-- reproduce:end -->\n\n"
        "<!-- reproduce:mnist:begin -->\nmnist 2\n<!-- reproduce:mnist:end -->\n\nafter\n"
    )
    fresh = tmp_path / "new.md"
    reproduce.write_results(fresh, block("x", "body"), "x")
    assert fresh.read_text().startswith("# Results\n\n## Reproduction\n\n<!-- reproduce:x:begin")

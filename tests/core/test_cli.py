"""The ``kru`` command: train, predict, overrides, errors, help."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import main

REPO = Path(__file__).resolve().parents[2]
CONFIG = {
    "name": "cli-test",
    "task": {"kind": "copy", "delay": 3, "eval_size": 8},
    "model": {"cell": "kru", "hidden_size": 8},
    "train": {"steps": 4, "batch_size": 4, "eval_every": 2, "checkpoint_every": 2, "device": "cpu"},
}


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_help_explains_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "train" in out and "predict" in out
    for command, words in [
        ("train", ["--config", "--out", "--set", "resume"]),
        ("predict", ["--input", "predictions", "--probabilities"]),
    ]:
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert all(w in text for w in words), (command, text)


def test_train_then_predict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_json(tmp_path / "job.json", CONFIG)
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--config",
            str(cfg),
            "--out",
            str(out),
            "--steps",
            "3",
            "--set",
            "train.lr=0.002",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0
    summary = json.loads(captured.out)
    assert summary["status"] == "completed" and summary["step"] == 3
    assert Path(summary["checkpoint"]) == out / "step-000000003"
    assert "step 3/3" in captured.err and "acc" in captured.err  # the progress line
    saved = json.loads((out / "step-000000003" / "checkpoint.json").read_text())
    assert saved["config"]["train"]["lr"] == 0.002 and saved["config"]["train"]["steps"] == 3

    inputs = write_json(
        tmp_path / "in.json", {"inputs": [[1, 2, 3] + [0] * 12 + [9] + [0] * 9, [1, 9]]}
    )
    assert main(["predict", str(out), "--input", str(inputs)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [len(p) for p in result["predictions"]] == [25, 2] and "probabilities" not in result
    assert main(["predict", str(out), "--input", str(inputs), "--probabilities"]) == 0
    assert len(json.loads(capsys.readouterr().out)["probabilities"][1][0]) == 9


def test_train_dataset_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"input": [i % 4, 1], "target": i % 2}) + "\n" for i in range(20))
    )
    cfg = write_json(tmp_path / "job.json", {**CONFIG, "task": {"kind": "dataset"}})
    assert (
        main(
            [
                "train",
                "--config",
                str(cfg),
                "--out",
                str(tmp_path / "r"),
                "--dataset",
                str(data),
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["status"] == "completed"
    # without --dataset, task.dataset_id is a path relative to the config file
    cfg2 = write_json(
        tmp_path / "job2.json", {**CONFIG, "task": {"kind": "dataset", "dataset_id": "d.jsonl"}}
    )
    assert main(["train", "--config", str(cfg2), "--out", str(tmp_path / "r2"), "--quiet"]) == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "train.lr=-1"], "train.lr"),
        (["--set", "train.nope=1"], "train.nope"),
        (["--set", "trainlr"], "SECTION.FIELD=VALUE"),
        (["--steps", "0"], "train.steps"),
    ],
)
def test_bad_overrides_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    cfg = write_json(tmp_path / "job.json", CONFIG)
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"), *args]) == 2
    assert message in capsys.readouterr().err


def test_errors_are_one_line_not_tracebacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "invalid JSON" in capsys.readouterr().err
    data = tmp_path / "d.jsonl"
    data.write_text('{"input": [1], "target": 0}\n{"input": "x", "target": 0}\n')
    cfg = write_json(tmp_path / "job.json", {**CONFIG, "task": {"kind": "dataset"}})
    assert (
        main(["train", "--config", str(cfg), "--out", str(tmp_path / "r"), "--dataset", str(data)])
        == 1
    )
    assert "line 2: input" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "missing"), "--input", str(cfg)]) == 2
    assert (
        main(
            [
                "predict",
                str(tmp_path / "missing"),
                "--input",
                str(write_json(tmp_path / "i.json", {"inputs": [[1]]})),
            ]
        )
        == 1
    )
    assert "not a checkpoint" in capsys.readouterr().err


def test_every_command_answers_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    listing = capsys.readouterr().out
    commands = ("train", "predict", "serve", "api", "worker", "jobs", "models")
    for command in commands:
        assert command in listing, command
        with pytest.raises(SystemExit) as done:
            main([command, "--help"])
        assert done.value.code == 0, command
        assert capsys.readouterr().out.startswith("usage: kru " + command), command


def test_console_entry_point_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main())", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0 and "usage: kru" in proc.stdout

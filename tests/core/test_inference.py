"""Inference: checkpoint -> ready model, predictions per task kind, input validation, generation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from kru_core.config import JobConfig
from kru_core.errors import InputError
from kru_core.inference import LoadedModel
from kru_core.models import build_model
from kru_core.tasks.mnist import mnist_task_info
from kru_core.training import train

torch.set_num_threads(1)


def config(task: dict, **model: object) -> JobConfig:
    return JobConfig.from_dict(
        {
            "task": {"eval_size": 8, **task},
            "model": {"cell": "kru", "hidden_size": 8, **model},
            "train": {"steps": 3, "batch_size": 4, "eval_every": 3, "device": "cpu"},
        }
    )


@pytest.fixture(scope="module")
def copy_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("copy")
    train(config({"kind": "copy", "delay": 3}), out_dir=out)
    return out


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("text")
    path = out / "t.txt"
    path.write_text("abracadabra, said the cat. " * 8)
    train(
        config({"kind": "text", "dataset_id": "t", "seq_len": 12}),
        out_dir=out / "run",
        dataset_path=path,
    )
    return out / "run"


def test_save_load_gives_identical_outputs(tmp_path: Path) -> None:
    cfg = config({"kind": "copy", "delay": 3})
    result = train(cfg, out_dir=tmp_path)
    loaded = LoadedModel.from_checkpoint(tmp_path)
    x = torch.randint(0, 10, (5, 23))
    # rebuild the trained model independently from the checkpoint's tensors
    from kru_core.checkpoint import load_checkpoint

    ckpt = load_checkpoint(result.checkpoint)
    reference = build_model(cfg.model, ckpt.task_info)
    reference.load_state_dict(ckpt.model_state)
    reference.eval()
    with torch.no_grad():
        want, _ = reference(x)
        got, _ = loaded.model(x)
    assert torch.equal(want, got)
    preds = loaded.predict(x.tolist(), probabilities=True)
    assert preds["predictions"] == want.argmax(-1).tolist()
    probs = torch.tensor(preds["probabilities"])
    assert torch.allclose(probs, want.softmax(-1), atol=1e-6)
    assert loaded.info["step"] == 3 and loaded.info["per_step"] is True
    assert loaded.info["vocab_size"] == 10 and loaded.info["input_size"] is None
    assert loaded.info["config"] == cfg.to_dict() and loaded.config == cfg
    json.dumps(loaded.info)  # plain JSON, ready for the model registry


def test_variable_lengths_are_masked(copy_model: Path) -> None:
    """A padded batch predicts what each sequence predicts alone."""
    model = LoadedModel.from_checkpoint(copy_model)
    seqs = [[1, 2, 3, 9, 0, 0, 0], [4, 5], [8]]
    together = model.predict(seqs)["predictions"]
    alone = [model.predict([s])["predictions"][0] for s in seqs]
    assert together == alone and [len(p) for p in together] == [7, 2, 1]


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ([], "inputs"),
        ("abc", "inputs"),
        ([[1, 2], [3, 10]], "inputs.1.1"),
        ([[1, 2], [3, -1]], "inputs.1.1"),
        ([[1, True]], "inputs.0.1"),
        ([[1.5]], "inputs.0.0"),
        ([[]], "inputs.0"),
        ([[1], "1"], "inputs.1"),
    ],
)
def test_token_inputs_are_validated(copy_model: Path, inputs: object, field: str) -> None:
    model = LoadedModel.from_checkpoint(copy_model)
    with pytest.raises(InputError) as info:
        model.predict(inputs)
    assert info.value.field == field


def write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("rows", "check"),
    [
        (
            [{"input": [[0.5, 1.0]] * (1 + i % 3), "target": i % 3} for i in range(20)],
            lambda p: all(isinstance(v, int) for v in p),
        ),
        (
            [{"input": [[0.5, 1.0]] * (1 + i % 3), "target": i / 7} for i in range(20)],
            lambda p: all(isinstance(v, float) for v in p),
        ),
        (
            [{"input": [[0.5, 1.0]] * (1 + i % 3), "target": [i / 7, 1.0]} for i in range(20)],
            lambda p: all(isinstance(v, list) and len(v) == 2 for v in p),
        ),
        (
            [{"input": [[0.5, 1.0]] * (1 + i % 3), "target": [1] * (1 + i % 3)} for i in range(20)],
            lambda p: [len(v) for v in p] == [1, 2, 3],
        ),
    ],
    ids=["classification", "regression", "vector-regression", "labelling"],
)
def test_prediction_shapes_per_kind(tmp_path: Path, rows: list[dict], check: object) -> None:
    path = write(tmp_path / "d.jsonl", rows)
    train(
        config({"kind": "dataset", "dataset_id": "d"}), out_dir=tmp_path / "run", dataset_path=path
    )
    model = LoadedModel.from_checkpoint(tmp_path / "run")
    out = model.predict([[[0.1, 0.2]], [[0.1, 0.2]] * 2, [[0.3, 0.4]] * 3])
    assert len(out["predictions"]) == 3 and check(out["predictions"])
    for bad, field in [
        ([[[0.1, 0.2, 0.3]]], "inputs.0.0"),
        ([[[0.1, math.nan]]], "inputs.0.0.1"),
        ([[[0.1, math.inf]]], "inputs.0.0.1"),
        ([[[0.1, "x"]]], "inputs.0.0.1"),
        ([[0.1, 0.2]], "inputs.0.0"),
    ]:
        with pytest.raises(InputError) as info:
            model.predict(bad)
        assert info.value.field == field


def test_permutation_is_applied_to_raw_inputs() -> None:
    info = mnist_task_info(torch.tensor([2, 0, 1]))  # permuted MNIST of 3-pixel images
    cfg = config({"kind": "copy"})
    torch.manual_seed(0)
    net = build_model(cfg.model, info)
    model = LoadedModel(net, task_info=info, config=cfg)
    raw = [0.1, 0.5, 0.9]  # plain numbers are accepted when input_size is 1
    got = model.predict([raw], probabilities=True)["probabilities"][0]
    with torch.no_grad():
        logits, _ = net(torch.tensor([[[0.9], [0.1], [0.5]]]))
    assert torch.allclose(torch.tensor(got), logits.softmax(-1)[0], atol=1e-6)
    with pytest.raises(InputError, match="expected 3 steps"):
        model.predict([[0.1, 0.2]])


def test_text_model_predicts_and_generates(text_model: Path) -> None:
    model = LoadedModel.from_checkpoint(text_model)
    vocab = model.info["vocabulary"]
    assert model.info["task_kind"] == "text" and vocab == sorted(set("abracadabra, said the cat. "))
    by_string = model.predict(["abra"])["predictions"]
    by_ids = model.predict([[vocab.index(c) for c in "abra"]])["predictions"]
    assert by_string == by_ids and len(by_string[0]) == 4
    with pytest.raises(InputError) as info:
        model.predict(["abZ"])
    assert info.value.field == "inputs.0.2"

    a = model.generate("the ", max_new_tokens=20, temperature=1.0, seed=3)
    b = model.generate("the ", max_new_tokens=20, temperature=1.0, seed=3)
    assert a == b and len(a) == 20 and set(a) <= set(vocab)
    assert model.generate("the ", max_new_tokens=0, temperature=1.0, seed=0) == ""
    greedy = model.generate("ca", max_new_tokens=5, temperature=0, seed=None)
    assert greedy == model.generate("ca", max_new_tokens=5, temperature=0, seed=1)

    # stepping one character at a time (hx) equals running the whole sequence
    ids = torch.tensor([[vocab.index(c) for c in "the cat"]])
    with torch.no_grad():
        full, _ = model.model(ids)
        _, hx = model.model(ids[:, :3])
        step, _ = model.model(ids[:, 3:4], hx=hx)
    assert torch.allclose(full[:, 3], step[:, 0], atol=1e-5)

    for kwargs, field in [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "xyz"}, "prompt.0"),
        ({"prompt": "a", "max_new_tokens": -1}, "max_new_tokens"),
        ({"prompt": "a", "temperature": -0.5}, "temperature"),
        ({"prompt": "a", "temperature": math.nan}, "temperature"),
    ]:
        args = {"max_new_tokens": 3, "temperature": 1.0, "seed": 0, **kwargs}
        with pytest.raises(InputError) as info:
            model.generate(args.pop("prompt"), **args)
        assert info.value.field == field


def test_generate_needs_a_text_model(copy_model: Path) -> None:
    model = LoadedModel.from_checkpoint(copy_model)
    with pytest.raises(InputError, match="text model"):
        model.generate("a", max_new_tokens=1, temperature=1.0, seed=0)

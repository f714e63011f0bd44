"""tools/gpu_train.py on CPU with tiny recipes: the same side-by-side runs, deadline and small files a lent GPU gets."""

import importlib.util
from pathlib import Path

import torch
import yaml

from tests.test_trainer import tiny_recipe

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("gpu_train", ROOT / "tools" / "gpu_train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_runs_side_by_side_finish_or_stop_at_the_deadline_and_come_back_as_backbone_files(tmp_path, capsys):
    from zoo.checkpoint import read_checkpoint

    gpu_train = _tool()
    recipes = tmp_path / "recipes"
    for method, epochs in (("short", 1), ("long", 500)):
        (recipes / method).mkdir(parents=True)
        (recipes / method / "tiny.yaml").write_text(yaml.safe_dump(tiny_recipe(epochs=epochs, checkpoint_every=2)))
    out = tmp_path / "out"
    code = gpu_train.main([str(recipes / "short" / "tiny.yaml"), str(recipes / "long" / "tiny.yaml"),
                           "--out", str(out), "--minutes", "0.5", "--set", "eval.knn_every=0"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["long-tiny.pt", "short-tiny.pt"]
    table = capsys.readouterr().out
    assert "| short-tiny | 6 | 1/1 |" in table  # 96 images, batch 16: finished
    long_row = next(line for line in table.splitlines() if line.startswith("| long-tiny |"))
    assert "/500 |" in long_row and int(long_row.split("|")[2]) < 500 * 6  # stopped by the deadline

    for name in ("short-tiny", "long-tiny"):
        slim = torch.load(out / f"{name}.pt", weights_only=True)
        assert set(slim) <= {"method", *gpu_train.KEPT_FIELDS} and "optimizer" not in slim
        assert all(k.startswith("backbone.") for k in slim["method"])
        ckpt = read_checkpoint(out / f"{name}.pt")  # what zoo eval --weights and zoo export read
        assert ckpt.recipe["train"]["checkpoint_every"] == 2 and ckpt.backbone
        assert slim["train_seconds"] > 0 and "threads" in slim["hardware"]


def test_a_recipe_that_fails_is_a_failed_row_and_the_exit_code_says_so(tmp_path, capsys):
    gpu_train = _tool()
    bad = tmp_path / "bad" / "tiny.yaml"
    bad.parent.mkdir()
    bad.write_text(yaml.safe_dump(tiny_recipe(compile="turbo")))
    assert gpu_train.main([str(bad), "--out", str(tmp_path / "out"), "--minutes", "1"]) == 1
    assert "| bad-tiny | **failed**: " in capsys.readouterr().out

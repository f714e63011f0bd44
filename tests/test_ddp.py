"""torch.distributed with two gloo processes on CPU: the same step as one process with the whole batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "ddp_worker.py"
CASES = {
    "simclr": {"temperature": 0.5, "proj_hidden": 64, "proj_dim": 32},
    "wmse": {"emb": 8, "hidden": 64, "w_size": 16, "w_iter": 2},
    "byol": {"proj_hidden": 64, "proj_dim": 32, "pred_hidden": 64},
}


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _run(method: str, out: Path, nproc: int) -> dict:
    hp = json.dumps(CASES[method])
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), method, hp, str(out)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(WORKER), method, hp, str(out)]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("method", list(CASES))
def test_two_gloo_processes_with_half_batches_match_one_process(method, tmp_path):
    one = _run(method, tmp_path / "one.json", 1)
    two = _run(method, tmp_path / "two.json", 2)
    assert two["world"] == 2
    fp32, fp64 = "torch.float32", "torch.float64"
    assert abs(one[fp32]["loss"] - two[fp32]["loss"]) < 1e-5, (one[fp32]["loss"], two[fp32]["loss"])
    g1, g2 = torch.tensor(one[fp64]["grad"], dtype=torch.float64), torch.tensor(two[fp64]["grad"], dtype=torch.float64)
    assert torch.allclose(g1, g2, rtol=1e-7, atol=1e-10), (g1 - g2).abs().max()


@pytest.mark.slow
def test_torchrun_two_processes_train_a_recipe_end_to_end(tmp_path):
    import yaml

    from test_trainer import tiny_recipe

    recipe = tiny_recipe(max_steps=3)
    recipe["method"] = {"name": "wmse", "emb": 8, "hidden": 64, "w_size": 16}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "training",
           str(path), "--out", str(tmp_path / "run"), "--no-progress"]
    res = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "k-NN top-1" in res.stdout
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 3

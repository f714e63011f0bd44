"""tools/gpu_check.py runs its every path on CPU with tiny sizes: on a GPU machine only the device differs."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_quick_runs_every_check_on_cpu_and_prints_one_table():
    res = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--quick"], capture_output=True,
                         text=True, timeout=600, cwd=ROOT)
    table = [line for line in res.stdout.splitlines() if line.startswith("| ")]
    assert table[0] == "| check | ok | result |", res.stdout[-2000:]
    rows = table[1:]
    assert sum(r.startswith("| train ") for r in rows) == 8 and any("zoo.embed" in r for r in rows)
    assert any("precision check int8" in r for r in rows) and any("Index(device='auto')" in r for r in rows)
    failed = [r for r in rows if "| **no** |" in r]
    assert res.returncode == 0 and not failed, "\n".join(failed) or res.stderr[-2000:]


def test_gpu_check_compile_row_reports_the_compiled_speed_beside_eager(monkeypatch):
    import importlib.util

    import torch

    import training.compile

    monkeypatch.setattr(training.compile, "BACKEND", "eager")  # the plumbing; inductor's codegen is the GPU's job
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    torch._dynamo.reset()
    (row,) = gpu_check.check_compile(("simclr",), steps=2, batch=64, dataset="synthetic")
    torch._dynamo.reset()
    assert row["ok"] and "x eager's step" in row["result"] and "s compiling" in row["result"], row

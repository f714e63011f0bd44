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

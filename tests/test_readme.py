"""The README's first example (`zoo.load("wmse-resnet50")`, embed, search) runs offline as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import zoo

README = Path(__file__).resolve().parents[1] / "README.md"


def _first_python_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    return blocks[0]


def test_readme_first_example_loads_the_headline_name_and_searches_offline(monkeypatch):
    code = _first_python_block()
    assert 'zoo.load("wmse-resnet50")' in code.splitlines()[2], "the README's first example starts with the headline"
    if not zoo.get_spec("wmse-resnet50").has_weights:
        pytest.skip("wmse-resnet50 weights are not shipped")
    pytest.importorskip("faiss")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)  # noqa: S102 - the documented example itself
    model = scope["model"]
    assert model.spec.name == "wmse-resnet50.fmnist" and model.spec.arch == "resnet50"
    assert scope["emb"].features.shape[1] == 2048 and len(scope["ids"][0]) == 5

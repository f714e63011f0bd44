"""Bad recipe overrides, damaged run folders and repeated resumes: one-line errors, nothing silently changed."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from test_trainer import tiny_recipe
from training.recipe import apply_overrides, load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_set_with_a_misspelt_key_is_refused_naming_the_closest_key():
    recipe = load_recipe(ROOT / "training" / "recipes" / "simclr" / "fmnist.yaml")
    with pytest.raises(KeyError, match="did you mean train.max_steps"):
        apply_overrides(recipe, ["train.max_stepz=3"])
    with pytest.raises(KeyError, match="did you mean method.temperature"):
        apply_overrides(recipe, ["method.temprature=0.2"])
    with pytest.raises(KeyError, match="did you mean optim"):
        apply_overrides(recipe, ["optimm.lr=0.1"])
    assert "max_stepz" not in recipe["train"]


def test_set_accepts_keys_the_schema_knows_that_the_recipe_does_not_hold():
    recipe = load_recipe(ROOT / "training" / "recipes" / "simclr" / "fmnist.yaml", ["train.max_steps=3",
                                                                                     "train.compile=true"])
    assert recipe["train"]["max_steps"] == 3 and recipe["train"]["compile"] is True


def test_every_key_of_every_shipped_training_recipe_is_in_the_schema():
    from training.recipe_schema import known_keys, view_keys

    for path in sorted((ROOT / "training" / "recipes").rglob("*.yaml")):
        if path.parent.name == "detection":
            continue
        recipe = yaml.safe_load(path.read_text())
        bare = {"method": {"name": recipe["method"]["name"]}}
        for section, body in recipe.items():
            if isinstance(body, dict):
                unknown = set(body) - known_keys({**bare, section: {}} if section != "method" else bare, section)
                assert not unknown, f"{path}: {section}.{sorted(unknown)} missing from the schema"
        for view in recipe["augment"]["views"]:
            assert set(view) <= view_keys(), path


def test_malformed_recipe_yaml_names_its_file_and_line(tmp_path):
    bad = tmp_path / "recipe.yaml"
    bad.write_text("method:\n  name: simclr\ntrain: [epochs: 1\n")
    with pytest.raises(ValueError, match=rf"{bad}:\d+: not valid YAML"):
        load_recipe(bad)
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="a recipe is a YAML mapping"):
        load_recipe(bad)


def test_zero_byte_checkpoint_is_a_one_line_error_naming_the_file(tmp_path):
    from zoo.checkpoint import load_checkpoint
    from zoo.errors import ZooError

    (tmp_path / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ZooError, match="cannot read checkpoint .*checkpoint.pt") as info:
        load_checkpoint(tmp_path / "checkpoint.pt")
    assert "\n" not in str(info.value)


def test_resume_drops_a_torn_last_metrics_line_instead_of_failing(tmp_path):
    from training.trainer import train

    run = tmp_path / "run"
    train(tiny_recipe(max_steps=3), run, progress=False)  # checkpoint_every=3: the checkpoint is at step 3
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["history"] = json.dumps([r for r in json.loads(ckpt["history"]) if not r.get("final")])
    torch.save(ckpt, run / "checkpoint.pt")  # as if killed before the final record
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.5, "imag')  # a kill mid-write
    final = train(tiny_recipe(max_steps=3), run, resume=True, progress=False)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines) and final["final"]


def test_resume_of_a_finished_run_adds_no_second_final_record_and_no_minutes(tmp_path):
    from training.trainer import train

    run = tmp_path / "run"
    first = train(tiny_recipe(max_steps=2), run, progress=False)
    before = (run / "metrics.jsonl").read_text()
    again = train(tiny_recipe(max_steps=2), run, resume=True, progress=False)
    assert again == first and (run / "metrics.jsonl").read_text() == before
    assert sum(1 for line in before.splitlines() if json.loads(line).get("final")) == 1

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from training.optim import LARS, build_optimizer, lr_factor
from training.recipe import apply_overrides, load_recipe

ROOT = Path(__file__).resolve().parents[1]


def tiny_recipe(method: dict | None = None, **train) -> dict:
    """SimCLR on generated 28 px images: a few seconds per run on 2 cores."""
    return {
        "method": method or {"name": "simclr", "temperature": 0.5, "proj_hidden": 64, "proj_dim": 32},
        "model": {"arch": "resnet18_narrow"},
        "data": {"dataset": "synthetic", "size": 96, "test_size": 64, "batch_size": 16, "workers": 0},
        "augment": {"views": [{"crop_size": 28, "crop_scale": [0.3, 1.0], "jitter": [0.4, 0.4, 0.0, 0.0],
                               "gray_p": 0.0, "repeat": 2}]},
        "optim": {"name": "lars", "lr": 0.3, "weight_decay": 1e-6},
        "schedule": {"kind": "cosine", "warmup_steps": 2},
        "train": {"epochs": 2, "precision": "fp32", "channels_last": False, "seed": 0, "checkpoint_every": 3,
                  "log_every": 1, **train},
        "eval": {"knn_every": 1, "knn_bank": 96, "knn_queries": 64},
    }


def _losses(run: Path) -> dict[int, float]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def test_set_overrides_nested_fields_and_rejects_unknown_sections():
    recipe = tiny_recipe()
    apply_overrides(recipe, ["train.epochs=3", "optim.lr=0.1", "seed=4"])
    assert recipe["train"]["epochs"] == 3 and recipe["optim"]["lr"] == 0.1 and recipe["train"]["seed"] == 4
    with pytest.raises(KeyError, match="not a section"):
        apply_overrides(recipe, ["nosuch.lr=1"])


def test_schedule_warms_up_linearly_then_follows_cosine_or_steps():
    cos = {"kind": "cosine", "warmup_steps": 10}
    assert lr_factor(0, 110, 10, cos) == pytest.approx(0.1)
    assert lr_factor(9, 110, 10, cos) == pytest.approx(1.0)
    assert lr_factor(60, 110, 10, cos) == pytest.approx(0.5)
    assert lr_factor(110, 110, 10, cos) == pytest.approx(0.0, abs=1e-12)
    step = {"kind": "step", "milestones": [5, 8], "gamma": 0.2}
    assert lr_factor(49, 100, 10, step) == 1.0
    assert lr_factor(50, 100, 10, step) == pytest.approx(0.2)
    assert lr_factor(85, 100, 10, step) == pytest.approx(0.04)


def test_milestone_fractions_resolve_to_epochs_of_the_run_and_follow_an_epochs_override(tmp_path):
    recipe = yaml.safe_load((ROOT / "training" / "recipes" / "wmse" / "fmnist.yaml").read_text())
    recipe["schedule"]["milestone_fractions"] = [0.95, 0.975]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert load_recipe(path, ["train.epochs=7"])["schedule"]["milestones"] == [6.65, 6.825]
    resolved = load_recipe(path, ["train.epochs=40"])
    assert resolved["schedule"]["milestones"] == [38.0, 39.0] and "milestone_fractions" not in resolved["schedule"]
    # Resolving is idempotent: a run's saved recipe.yaml (epochs, no fractions) loads back to the same recipe.
    saved = tmp_path / "saved.yaml"
    saved.write_text(yaml.safe_dump(resolved))
    assert load_recipe(saved) == resolved
    recipe["schedule"]["milestones"] = [3]
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match="both milestones and milestone_fractions"):
        load_recipe(path)
    del recipe["schedule"]["milestones"]
    recipe["schedule"]["milestone_fractions"] = [95]
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\)"):
        load_recipe(path)


def test_lars_excludes_batchnorm_and_biases_from_decay_and_adaptation():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    opt, _ = build_optimizer(model, {"name": "lars", "lr": 1.0, "weight_decay": 0.1}, 256)
    assert isinstance(opt, LARS)
    decayed, excluded = opt.param_groups
    assert all(p.ndim == 2 for p in decayed["params"]) and decayed["lars"] and decayed["weight_decay"] == 0.1
    assert all(p.ndim == 1 for p in excluded["params"]) and not excluded["lars"] and excluded["weight_decay"] == 0


def test_the_implementations_cover_exactly_the_registry_methods():
    from training.methods import IMPLEMENTATIONS, get_method_class
    from zoo.registry import METHODS

    assert sorted(IMPLEMENTATIONS) == sorted(METHODS)
    for name in METHODS:
        assert get_method_class(name).__name__ == IMPLEMENTATIONS[name][1]
    with pytest.raises(KeyError, match="unknown method 'wmsee'.*Known: wmse"):
        get_method_class("wmsee")


def test_every_shipped_recipe_loads_and_names_a_known_method():
    from zoo.registry import METHODS

    recipes = sorted(p for p in (ROOT / "training" / "recipes").rglob("*.yaml") if p.parent.name != "detection")
    assert recipes  # detection/: transfer recipes of training/detection.py, tested in test_detection.py
    for path in recipes:
        recipe = load_recipe(path)
        assert recipe["method"]["name"] in METHODS, path


def test_training_run_writes_checkpoint_metrics_and_a_knn_number(tmp_path):
    from training.trainer import train

    final = train(tiny_recipe(), tmp_path / "run", progress=False)
    assert final["step"] == 12 and 0 <= final["knn_top1"] <= 100
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 12 and any(k.startswith("backbone.") for k in ckpt["method"])
    losses = _losses(tmp_path / "run")
    assert sorted(losses) == list(range(1, 13)) and all(map(lambda v: v == v, losses.values()))
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["method"]["name"] == "simclr"


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    from training.trainer import TrainingDiverged, train

    recipe = tiny_recipe()
    recipe["optim"] = {"name": "sgd", "lr": 1e30}
    with pytest.raises(TrainingDiverged, match="--resume"):
        train(recipe, tmp_path / "run", progress=False)
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step"] >= 0


def test_interrupted_train_prints_one_line_naming_resume_and_the_resumed_run_finishes(tmp_path, monkeypatch, capsys):
    from training.trainer import Trainer
    from zoo_cli.main import main

    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe(max_steps=4)))
    run = tmp_path / "run"
    real_step = Trainer.train_step

    def step_then_ctrl_c(self, images):
        if self.step == 2:  # after the step-0 checkpoint and two steps: what Ctrl-C mid-run looks like
            raise KeyboardInterrupt
        return real_step(self, images)

    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)
    assert main(["train", str(recipe_path), "--out", str(run), "--no-progress"]) == 130
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and f"zoo train --resume {run}" in err[0]
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0
    assert max(_losses(run)) == 4


def test_starting_over_an_existing_run_refuses_and_points_to_resume(tmp_path):
    from training.trainer import train
    from zoo.errors import ZooError

    train(tiny_recipe(max_steps=2), tmp_path / "run", progress=False)
    with pytest.raises(ZooError, match="--resume"):
        train(tiny_recipe(max_steps=2), tmp_path / "run", progress=False)


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_repeats_the_uninterrupted_losses(tmp_path):
    recipe_path = tmp_path / "recipe.yaml"
    recipe = tiny_recipe(epochs=3)
    recipe_path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cli = [sys.executable, "-m", "zoo_cli", "train", "--no-progress"]

    ref = tmp_path / "ref"
    subprocess.run([*cli, str(recipe_path), "--out", str(ref)], env=env, check=True, capture_output=True, timeout=300)

    run = tmp_path / "killed"
    proc = subprocess.Popen([*cli, str(recipe_path), "--out", str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline:  # kill once step 7 (mid-epoch 2, after the checkpoint at step 6) is logged
        if (run / "metrics.jsonl").exists() and max(_losses(run) or [0]) >= 7:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert max(_losses(run)) < 18, "the run finished before it could be killed"
    subprocess.run([*cli, "--resume", str(run)], env=env, check=True, capture_output=True, timeout=300)
    assert _losses(run) == _losses(ref)


def _shrunk(recipe: dict) -> dict:
    """The recipe on generated 28 px images, crops scaled to <= 32 px (ImageNet stems need that much to keep BN sane), 2 steps: cheap enough for CI."""
    biggest = max(v.get("crop_size", 32) for v in recipe["augment"]["views"])
    for view in recipe["augment"]["views"]:
        view["crop_size"] = max(24, round(view.get("crop_size", 32) * min(1.0, 32 / biggest)))
        view.pop("blur_kernel", None)
    method = recipe["method"]
    if "w_size" in method:  # W-MSE: the smallest valid whitening (w_size = 2 x emb), not 4 x 256 views per step
        method.update(emb=8, w_size=16)
    batch = 16
    recipe["data"] = {"dataset": "synthetic", "size": 2 * batch, "test_size": 32, "batch_size": batch, "workers": 0}
    recipe["train"].update(max_steps=2, checkpoint_every=1000, log_every=1, compile=False)
    recipe["eval"] = {"knn_every": 0, "knn_bank": 32, "knn_queries": 32}
    # ImageNet archs on 32 px crops end in 1x1 maps, where the papers' learning rates blow up in a step or
    # two (GroCo's 24 did here): this test is about building and stepping, not about those rates.
    recipe["optim"]["lr"] = float(recipe["optim"]["lr"]) * 1e-3
    if "queue_size" in method:
        method["queue_size"] = 4 * batch
    return recipe


RECIPES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "training" / "recipes").rglob("*.yaml")
                 if p.parent.name != "detection")  # pretraining recipes only


def _train_two_steps(trainer) -> list[tuple[float, dict]]:
    """(loss, logs) of two optimiser steps on the first batches; no checkpoint writes (ResNet-50 states are ~0.5 GB)."""
    from training.data import iterate_batches

    steps = []
    for images, _, _ in iterate_batches(trainer.dataset, trainer.plan, 0, 0, 0):
        steps.append(trainer.train_step(images))
        trainer.step += 1
        if trainer.step == 2:
            break
    return steps


@pytest.mark.slow
@pytest.mark.parametrize("path", RECIPES)
def test_recipe_builds_its_model_and_trains_two_steps_on_generated_data(path, tmp_path):
    from training.trainer import Trainer

    trainer = Trainer(_shrunk(load_recipe(ROOT / path)), tmp_path / "run", progress=False)
    for loss, logs in _train_two_steps(trainer):
        assert loss == loss and logs["grad_norm"] == logs["grad_norm"]
    assert trainer.step == 2


def test_image_folder_skips_and_counts_corrupt_files_and_keeps_batches_full(tmp_path):
    from PIL import Image

    from training.data import BatchPlan, ImageFolderImages, iterate_batches

    for c in ("cat", "dog"):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 30), (i * 40, 90, 200)).save(tmp_path / c / f"{i}.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    (tmp_path / "cat" / "empty.png").write_bytes(b"")
    ds = ImageFolderImages(tmp_path, size=16)
    assert len(ds) == 8 and ds.classes == ["cat", "dog"]
    plan = BatchPlan(len(ds), global_batch=4, seed=0)
    batches = list(iterate_batches(ds, plan, epoch=0, start_batch=0, workers=2))
    assert sum(skipped for _, _, skipped in batches) == 2
    assert [len(images) for images, _, _ in batches] == [4, 4]  # slots of unreadable files refilled
    assert all(images.shape[1:] == (3, 16, 16) and images.dtype == torch.uint8 for images, _, _ in batches)


def test_image_folder_trains_on_every_file_embed_reads_gif_included(tmp_path):
    from PIL import Image

    from training.data import ImageFolderImages
    from zoo.images import list_images, read_image

    (tmp_path / "cat").mkdir()
    Image.new("P", (20, 12), 3).save(tmp_path / "cat" / "a.gif")  # palette GIF: the trainer read none before
    Image.new("L", (20, 12), 90).save(tmp_path / "cat" / "b.pgm")
    Image.new("RGB", (20, 12), (9, 90, 200)).save(tmp_path / "cat" / "c.jpg")
    ds = ImageFolderImages(tmp_path, size=8)
    assert [str(p) for p, _ in ds.samples] == list_images(tmp_path)  # one extension list, the same files
    assert read_image(tmp_path / "cat" / "a.gif").mode == "RGB"
    image, label = ds[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.uint8 and label == 0


def test_bench_train_reports_speed_and_shares_side_by_side(capsys):
    from zoo_cli.bench.train import bench_train

    rows = bench_train(["simclr", "wmse"], steps=2, batch_size=128, dataset="synthetic")  # W-MSE: w_size 128
    out = capsys.readouterr().out
    assert [r["method"] for r in rows] == ["simclr", "wmse"]
    for r in rows:
        assert r["images_per_s"] > 0 and 0 < r["augment"] < 1 and 0 < r["backbone_fwd"] < 1
    assert "img/s" in out and "lightly-loss step / ours" in out


def test_bench_train_bf16_prints_the_speedup_over_the_recipe_precision(capsys):
    from zoo_cli.bench.train import bench_train

    (row,) = bench_train(["simclr"], steps=2, batch_size=64, dataset="synthetic", bf16=True)
    assert row["bf16_channels_last_speedup"] > 0
    assert "bf16+channels-last speed-up" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10", "imagenet", "tiny_imagenet"])
def test_missing_dataset_files_say_where_to_put_them_and_nothing_downloads(name, tmp_path):
    from training.data import build_dataset
    from zoo.datasets import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError, match="data.root|place|folder"):
        build_dataset({"dataset": name, "root": str(tmp_path / "empty")}, "train")
    with pytest.raises(DatasetNotFoundError, match="data.root"):
        build_dataset({"dataset": name, "root": None}, "train")
    assert not (tmp_path / "empty").exists() or not any((tmp_path / "empty").iterdir())


def test_a_training_run_is_evaluated_into_results_json_with_its_training_minutes_and_hardware(tmp_path):
    from training.trainer import train
    from zoo_cli.main import main

    run = tmp_path / "run"
    final = train(tiny_recipe(max_steps=2), run, progress=False)
    assert final["train_minutes"] >= 0
    results = run / "results.json"
    args = ["eval", "knn", "simclr-resnet18_narrow.fmnist", "--weights", str(run), "--limit-train", "300",
            "--limit-test", "100", "--results", str(results), "--no-progress"]
    assert main(args) == 0
    data = json.loads(results.read_text())
    assert 0 <= data["knn_k20"] <= 100 and "train_minutes" in data and "cosine" in data["protocol"]
    assert "threads" in data["hardware"] or "x " in data["hardware"]  # the CPU model and threads, or the GPUs


def test_a_run_resumed_on_other_hardware_names_every_machine_it_ran_on(tmp_path, monkeypatch):
    import training.trainer as trainer_module
    from training.trainer import train

    run = tmp_path / "run"
    train(tiny_recipe(max_steps=2), run, progress=False)
    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    ckpt["history"] = json.dumps([r for r in json.loads(ckpt["history"]) if not r.get("final")])
    torch.save(ckpt, run / "checkpoint.pt")  # as if stopped before the end
    monkeypatch.setattr(trainer_module, "describe_hardware", lambda device, world: "1x Other GPU")
    train(tiny_recipe(max_steps=2), run, resume=True, progress=False)
    hardware = json.loads(torch.load(run / "checkpoint.pt", weights_only=True)["hardware"])
    assert len(hardware) == 2 and hardware[1] == "1x Other GPU" and "threads" in hardware[0]


SHIPPED_CPU_RECIPES = [p for p in RECIPES if p.endswith("/fmnist.yaml")]  # the eight methods' shipped weights


def _method_state_after_two_steps(path: str, out: Path, seed: int) -> dict[str, torch.Tensor]:
    from training.trainer import Trainer

    recipe = _shrunk(load_recipe(ROOT / path))
    recipe["train"]["seed"] = seed
    trainer = Trainer(recipe, out, progress=False)
    _train_two_steps(trainer)
    return {k: v.detach().clone() for k, v in trainer.method.state_dict().items()}


@pytest.mark.slow
@pytest.mark.parametrize("path", SHIPPED_CPU_RECIPES)
def test_same_seed_trains_bit_identical_weights_and_another_seed_does_not(path, tmp_path):
    # What "rerunning a recipe with its seed reproduces the shipped weights" rests on: every draw (init, batch
    # order, augmentations, queue/negatives) comes from the seed, and the CPU kernels are deterministic.
    first = _method_state_after_two_steps(path, tmp_path / "a", seed=0)
    again = _method_state_after_two_steps(path, tmp_path / "b", seed=0)
    other = _method_state_after_two_steps(path, tmp_path / "c", seed=1)
    assert first.keys() == again.keys()
    differing = [k for k in first if not torch.equal(first[k], again[k])]
    assert not differing, f"same seed, different tensors: {differing[:5]}"
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())

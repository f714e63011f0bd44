"""`train.compile`: the plumbing, on the "eager" compile backend (inductor's codegen takes minutes on 2 cores;
`zoo bench train --compile` runs the real one and measures it)."""

import pytest
import torch
import yaml

from tests.test_trainer import _losses, tiny_recipe


@pytest.fixture
def eager_backend(monkeypatch):
    import training.compile

    monkeypatch.setattr(training.compile, "BACKEND", "eager")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("value", ["fast", 1, "max_autotune"])
def test_a_bad_train_compile_value_fails_at_once_naming_the_accepted_ones(value, tmp_path):
    from training.trainer import train
    from zoo.errors import ZooError

    with pytest.raises(ZooError, match="train.compile is .*set it to false, true or one of default, reduce-overhead"):
        train(tiny_recipe(compile=value), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists(), "nothing is written before the recipe is accepted"


@pytest.mark.parametrize("value,mode", [(False, None), (None, None), (True, "default"),
                                        ("reduce-overhead", "reduce-overhead"), ("max-autotune", "max-autotune")])
def test_train_compile_accepts_false_true_and_the_torch_compile_modes(value, mode):
    from training.compile import compile_mode

    assert compile_mode(value) == mode


def test_compile_compiles_every_network_in_place_and_leaves_checkpoint_keys_unchanged(tmp_path, eager_backend):
    from training.data import iterate_batches
    from training.trainer import Trainer

    eager = Trainer(tiny_recipe(), tmp_path / "eager", progress=False)
    compiled = Trainer(tiny_recipe(compile=True), tmp_path / "compiled", progress=False)
    children = dict(compiled.method.named_children())
    assert set(children) == {"backbone", "projector"}
    assert all(child._compiled_call_impl is not None for child in children.values())
    assert all(child._compiled_call_impl is None for child in eager.method.children())
    assert list(compiled.state()["method"]) == list(eager.state()["method"])  # no `_orig_mod.` anywhere
    images, _, _ = next(iterate_batches(compiled.dataset, compiled.plan, 0, 0, 0))
    loss, _ = compiled.train_step(images)
    assert torch.isfinite(torch.tensor(loss))


@pytest.mark.parametrize("first,then", [(True, False), (False, True)])
def test_a_run_resumed_with_compile_switched_repeats_the_uninterrupted_losses(first, then, tmp_path, monkeypatch,
                                                                                eager_backend):
    from training.trainer import Trainer, train
    from zoo_cli.main import main

    ref = tmp_path / "ref"
    train(tiny_recipe(max_steps=6), ref, progress=False)

    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(tiny_recipe(max_steps=6, compile=first)))
    run = tmp_path / "run"
    real_step = Trainer.train_step

    def step_then_ctrl_c(self, images):
        if self.step == 4:  # the last checkpoint is step 3's
            raise KeyboardInterrupt
        return real_step(self, images)

    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)
    assert main(["train", str(recipe_path), "--out", str(run), "--no-progress"]) == 130
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert main(["train", "--resume", str(run), "--set", f"train.compile={str(then).lower()}", "--no-progress"]) == 0
    assert yaml.safe_load((run / "recipe.yaml").read_text())["train"]["compile"] is then
    assert _losses(run) == pytest.approx(_losses(ref), rel=1e-5)


def test_resume_still_refuses_a_change_to_what_the_run_computes(tmp_path, capsys):
    from training.trainer import train
    from zoo_cli.main import main

    train(tiny_recipe(max_steps=2), tmp_path / "run", progress=False)
    assert main(["train", "--resume", str(tmp_path / "run"), "--set", "optim.lr=0.1", "--no-progress"]) == 2
    assert "other than train.compile" in capsys.readouterr().err


def test_bench_train_compile_prints_the_speedup_and_the_compile_seconds(capsys, eager_backend):
    from zoo_cli.bench.train import bench_train

    (row,) = bench_train(["simclr"], steps=2, batch_size=64, dataset="synthetic", compile_mode="reduce-overhead")
    assert row["compile_speedup"] > 0 and row["compile_s"] >= 0 and row["compile_mode"] == "reduce-overhead"
    assert "compile (reduce-overhead) speed-up" in capsys.readouterr().out


def test_bench_train_refuses_an_unknown_compile_mode_before_building_a_model():
    from zoo.errors import ZooError
    from zoo_cli.bench.train import bench_train

    with pytest.raises(ZooError, match="set it to false, true or one of"):
        bench_train(["simclr"], steps=2, dataset="synthetic", compile_mode="turbo")

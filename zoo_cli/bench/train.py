"""`zoo bench train`: per method, at its Fashion-MNIST recipe on the CPU arch, side by side in one run:
images/s of a full training step, the share of the step spent in augmentation, in the backbone's
forward, and in the heads + loss forward; and, where lightly implements the same loss, the step
time with lightly's loss swapped in, as a ratio."""

from __future__ import annotations

import importlib
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from training.compile import compile_mode as checked_compile_mode
from training.data import iterate_batches
from training.recipe import load_recipe
from training.trainer import Trainer
from zoo.registry import METHODS


def _lightly_losses() -> dict[str, tuple[str, str, Callable[[Any], Callable]]]:
    """method -> (our module, our loss function name, factory of a drop-in replacement from lightly)."""

    def nt_xent(_):
        from lightly.loss import NTXentLoss

        def loss(z1, z2, temperature):
            return NTXentLoss(temperature=temperature)(z1, z2)
        return loss

    def byol(_):
        from lightly.loss import NegativeCosineSimilarity

        def loss(p, z):  # lightly's is -cos; 2 - 2cos has the same gradient up to the factor 2
            return 2 + 2 * NegativeCosineSimilarity()(p, z.detach())
        return loss

    def wmse(_):
        from lightly.loss import WMSELoss

        def loss(views, w_size, w_iter=1, eps=0.0, perms=None, generator=None):
            # lightly whitens the views' concatenation in the same sub-batch loop as the authors
            fn = WMSELoss(embedding_dim=views[0].shape[1], eps=eps, track_running_stats=False, w_iter=w_iter,
                          w_size=w_size, num_samples=len(views))
            return fn(torch.cat(list(views)))
        return loss

    return {"simclr": ("training.methods.simclr", "nt_xent_loss", nt_xent),
            "byol": ("training.methods.byol", "byol_loss", byol),
            "wmse": ("training.methods.wmse", "wmse_loss", wmse)}


@contextmanager
def _swapped(module: str, attr: str, replacement: Callable) -> Iterator[None]:
    mod = importlib.import_module(module)
    original = getattr(mod, attr)
    setattr(mod, attr, replacement)
    try:
        yield
    finally:
        setattr(mod, attr, original)


def _time_steps(trainer: Trainer, batches: list[torch.Tensor], hook_backbone: bool = True) -> dict[str, float]:
    """Step time and shares over batches[1:] after a warm-up on batches[0]. `hook_backbone=False` for a
    compiled trainer: a timing hook inside a compiled module would be traced into its graph."""
    backbone_time = [0.0]
    start: list[float] = []
    hooks = []
    if hook_backbone:
        hooks.append(trainer.method.backbone.register_forward_pre_hook(lambda *_: start.append(time.perf_counter())))
        hooks.append(trainer.method.backbone.register_forward_hook(
            lambda *_: backbone_time.__setitem__(0, backbone_time[0] + time.perf_counter() - start.pop())))
    totals = {"augment": 0.0, "forward": 0.0, "backward_update": 0.0}
    try:
        trainer.train_step(batches[0])  # warm-up (allocator, first-call overheads)
        backbone_time[0] = 0.0
        for images in batches[1:]:
            trainer.train_step(images)
            for k, v in trainer.last_timing.items():
                totals[k] += v
    finally:
        for hook in hooks:
            hook.remove()
    step = sum(totals.values())
    n = len(batches) - 1
    # Momentum targets also run a backbone (not hooked): their share lands in "heads+loss".
    return {"images_per_s": n * batches[0].shape[0] / step, "step_s": step / n,
            "augment": totals["augment"] / step, "backbone_fwd": backbone_time[0] / step,
            "heads_loss_fwd": (totals["forward"] - backbone_time[0]) / step if hook_backbone else float("nan")}


def _compile_speedup(recipe_path: str, overrides: list[str], mode: str, batches: list[torch.Tensor],
                     eager: Trainer, eager_step_s: float) -> dict[str, float]:
    """The recipe's step time over the same step with `train.compile=mode` (eager - compiled - eager on the
    same batches), and the seconds the compiler took (its first two steps, less two compiled steps)."""
    recipe = load_recipe(recipe_path, overrides + [f"train.compile={mode}"])
    with tempfile.TemporaryDirectory() as tmp:
        compiled = Trainer(recipe, tmp, progress=False)
        t0 = time.perf_counter()
        compiled.train_step(batches[0])  # compiles forward and backward
        compiled.train_step(batches[1])  # and what the second step recompiles (guards on step-dependent state)
        first_two = time.perf_counter() - t0
        fast = _time_steps(compiled, batches, hook_backbone=False)
    again = _time_steps(eager, batches)
    return {"compile_speedup": (eager_step_s + again["step_s"]) / 2 / fast["step_s"],
            "compile_s": max(first_two - 2 * fast["step_s"], 0.0), "compiled_images_per_s": fast["images_per_s"]}


def bench_train(methods: list[str] | None = None, steps: int = 6, batch_size: int | None = None,
                dataset: str | None = None, bf16: bool = False, compile_mode: str | None = None) -> list[dict[str, Any]]:
    """One row per method; `bf16=True` adds `bf16_channels_last_speedup`: the recipe's step time over
    the same step under bf16 autocast with channels-last tensors (fp32 - bf16 - fp32 on the same batches);
    `compile_mode` adds `compile_speedup` and `compile_s` for the recipe with `train.compile` set to it."""
    if compile_mode is not None:
        compile_mode = checked_compile_mode(compile_mode)  # a bad mode fails before any model is built
    rows = []
    for method in methods or METHODS:
        overrides = ["train.max_steps=1000000", "eval.knn_every=0"]
        if batch_size:
            overrides.append(f"data.batch_size={batch_size}")
        if dataset:
            overrides += [f"data.dataset={dataset}", "data.size=512"]
        recipe_path = f"training/recipes/{method}/fmnist.yaml"
        recipe = load_recipe(recipe_path, overrides)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(recipe, tmp, progress=False)
            batches = [x for x, _, _ in iterate_batches(trainer.dataset, trainer.plan, 0, 0, 0)][: steps + 1]
            row = {"method": method, "batch": trainer.plan.global_batch, **_time_steps(trainer, batches)}
            if method in _lightly_losses():
                module, attr, factory = _lightly_losses()[method]
                try:
                    with _swapped(module, attr, factory(None)):
                        theirs = _time_steps(trainer, batches)
                    again = _time_steps(trainer, batches)  # ours - theirs - ours: cancels warm-up order effects
                    row["lightly_step_ratio"] = theirs["step_s"] / ((row["step_s"] + again["step_s"]) / 2)
                except ImportError:
                    row["lightly_step_ratio"] = None
            if bf16:
                fast_recipe = load_recipe(recipe_path, overrides + ["train.precision=bf16", "train.channels_last=true"])
                with tempfile.TemporaryDirectory() as fast_tmp:
                    fast_trainer = Trainer(fast_recipe, fast_tmp, progress=False)
                    fast = _time_steps(fast_trainer, batches)
                again = _time_steps(trainer, batches)  # recipe - bf16 - recipe, as for lightly above
                row["bf16_channels_last_speedup"] = (row["step_s"] + again["step_s"]) / 2 / fast["step_s"]
            if compile_mode:
                row.update(_compile_speedup(recipe_path, overrides, compile_mode, batches, trainer, row["step_s"]),
                           compile_mode=compile_mode)
        rows.append(row)
        print(_format_row(row), flush=True)
    return rows


def _format_row(r: dict[str, Any]) -> str:
    lightly = r.get("lightly_step_ratio", "n/a")
    lightly = f"{lightly:.2f}" if isinstance(lightly, float) else ("lightly not installed" if lightly is None else "-")
    return (f"{r['method']:15s} batch {r['batch']:4d}  {r['images_per_s']:7.1f} img/s  step {r['step_s'] * 1000:7.1f} ms  "
            f"augment {100 * r['augment']:5.1f}%  backbone fwd {100 * r['backbone_fwd']:5.1f}%  "
            f"heads+loss fwd {100 * r['heads_loss_fwd']:5.1f}%  lightly-loss step / ours: {lightly}"
            + (f"  bf16+channels-last speed-up: {r['bf16_channels_last_speedup']:.2f}x"
               if "bf16_channels_last_speedup" in r else "")
            + (f"  compile ({r['compile_mode']}) speed-up: {r['compile_speedup']:.2f}x after {r['compile_s']:.0f} s "
               f"compiling" if "compile_speedup" in r else ""))

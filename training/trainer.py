"""One trainer for every method: recipe in, checkpoints and a k-NN-monitored backbone out.

The trainer knows nothing of any single method: it builds the backbone, asks
`training.methods.get_method_class(recipe.method.name)` for the method, and drives it through
`forward(Views) -> (loss, logs)` and `after_optimizer_step`. Everything random is drawn from
generators seeded by (seed, step), so a resumed run and every DDP rank reproduce the same draws.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.augment import build_augment
from training.compile import compile_mode, compile_networks, without_run_only_keys
from training.data import BatchPlan, build_dataset, iterate_batches
from training.methods import get_method_class
from training.optim import build_optimizer, lr_factor
from training.recipe import dump_recipe
from zoo.backbones import create_backbone
from zoo.checkpoint import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from zoo.distributed import init_from_env, rank, world_size
from zoo.errors import ZooError
from zoo.fsutil import atomic_write_text
from zoo.knn import knn_accuracy
from zoo.preprocess import Preprocess
from zoo.provenance import config_hash
from zoo.registry import get_dataset
from zoo.runners import run_chunks

log = logging.getLogger("training")

class TrainingDiverged(ZooError, FloatingPointError):
    pass


def _subset(ds, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random subset (same every call) of a dataset as uint8 images and labels."""
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(12345))[: min(n, len(ds))]
    if hasattr(ds, "batch"):
        return ds.batch(idx)
    samples = [s for s in (ds[int(i)] for i in idx) if s is not None]
    return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step_generator(seed: int, step: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2**63 - 1))


def describe_hardware(device: torch.device, world: int) -> str:
    """Where a session trains, for the model card: the GPU's name, or the CPU's and its thread count."""
    if device.type == "cuda":
        return f"{world}x {torch.cuda.get_device_name(device)}"
    cpu = platform.processor() or platform.machine()
    try:  # Linux names the model here; platform.processor() is often just the architecture
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{world}x {cpu}, {torch.get_num_threads()} threads" if world > 1 else f"{cpu}, {torch.get_num_threads()} threads"


def _logged_at_or_before(line: str, step: int) -> bool:
    """A metrics.jsonl line to keep on resume; a torn line (a kill mid-write) is dropped, not fatal."""
    try:
        record = json.loads(line)
    except ValueError:
        return False
    return isinstance(record, dict) and record.get("step", 0) <= step


def wrap_distributed(method: nn.Module, device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(method with SyncBatchNorm, DDP wrapper to call) under torch.distributed; (method, method) otherwise."""
    if world_size() == 1:
        return method, method
    if device.type == "cuda":
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
    else:  # torch's SyncBatchNorm is CUDA-only
        from training.sync_bn import convert_global_batchnorm

        method = convert_global_batchnorm(method)
    # broadcast_buffers=False: queues are kept identical by the methods themselves and SyncBN keeps running
    # stats in step; broadcasting a 128k-row queue every step would cost more than the model.
    ddp = nn.parallel.DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None,
                                              broadcast_buffers=False)
    return method, ddp


class Trainer:
    def __init__(self, recipe: dict[str, Any], out_dir: str | os.PathLike, resume: bool = False,
                 progress: bool = True):
        self.recipe = recipe
        self.out = Path(out_dir)
        self.progress = progress
        self.device = init_from_env()
        self.rank, self.world = rank(), world_size()
        tcfg = recipe["train"]
        self.compile_mode = compile_mode(tcfg.get("compile"))  # checked before any work: a bad value fails at once
        self.seed = int(tcfg.get("seed", 0))
        torch.manual_seed(self.seed)

        data_cfg = recipe["data"]
        self.dataset = build_dataset(data_cfg, "train")
        row = get_dataset(data_cfg["dataset"])
        self.mean, self.std = row.mean, row.std
        self.plan = BatchPlan(len(self.dataset), int(data_cfg["batch_size"]), self.seed, self.rank, self.world)
        self.epochs = int(tcfg["epochs"])
        self.total_steps = self.epochs * self.plan.batches_per_epoch
        if tcfg.get("max_steps"):
            self.total_steps = min(self.total_steps, int(tcfg["max_steps"]))

        method_cls = get_method_class(recipe["method"]["name"])
        self.augment = build_augment(recipe["augment"], self.mean, self.std)
        if method_cls.needs_params and self.augment.param_groups is None:
            raise ValueError(f"{method_cls.name} needs augmentation parameter vectors: set augment.params")
        if method_cls.needs_original and not self.augment.return_original:
            raise ValueError(f"{method_cls.name} needs the un-augmented image: set augment.original: true")
        backbone = create_backbone(recipe["model"]["arch"], bool(recipe["model"].get("zero_init_residual", False)))
        self.method = method_cls.from_config(backbone, recipe["method"]).to(self.device)
        self.channels_last = bool(tcfg.get("channels_last", True))
        if self.channels_last:
            self.method = self.method.to(memory_format=torch.channels_last)
        self.method, self.model = wrap_distributed(self.method, self.device)  # before the optimiser: SyncBN swaps modules
        self.optimizer, self.base_lrs = build_optimizer(self.method, recipe["optim"], int(data_cfg["batch_size"]))
        if self.compile_mode:
            compile_networks(self.method, self.compile_mode)
        self.precision = tcfg.get("precision", "fp32")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.skipped_files = 0
        self.train_seconds = 0.0  # wall-clock time spent in fit(), summed over resumed sessions
        self.hardware: list[str] = []  # where each session ran: the card names all of them
        self.history: list[dict[str, Any]] = []
        self._tensorboard: Any = None
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self._resume()
        elif (self.out / CHECKPOINT_FILE).exists():
            raise ZooError(f"{self.out} already holds a run; continue it with `zoo train --resume {self.out}` "
                           f"or pass another --out")
        if self.rank == 0:
            dump_recipe(recipe, self.out / "recipe.yaml")

    # ---------------------------------------------------------------- checkpoints
    def state(self) -> dict[str, Any]:
        return {"method": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "step": self.step, "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch, "torch_rng": torch.get_rng_state(),
                "recipe_json": json.dumps(self.recipe, sort_keys=True), "recipe_hash": config_hash(self.recipe),
                "history": json.dumps(self.history), "skipped_files": self.skipped_files,
                "train_seconds": self._elapsed(), "hardware": json.dumps(self.hardware)}

    def _elapsed(self) -> float:
        started = getattr(self, "_fit_started", None)
        return self.train_seconds + (time.time() - started if started is not None else 0.0)

    def save(self) -> None:
        if self.rank == 0:
            save_checkpoint(self.state(), self.out / CHECKPOINT_FILE)

    def _resume(self) -> None:
        path = self.out / CHECKPOINT_FILE
        if not path.exists():
            raise ZooError(f"nothing to resume in {self.out} (no {CHECKPOINT_FILE}); start the run without "
                           f"--resume")
        ckpt = load_checkpoint(path)
        if (ckpt["recipe_hash"] != config_hash(self.recipe)
                and config_hash(without_run_only_keys(json.loads(ckpt["recipe_json"])))
                != config_hash(without_run_only_keys(self.recipe))):
            raise ZooError(f"the recipe differs from the one {self.out} was started with; resume without --set "
                           f"overrides other than train.compile (the saved recipe is {self.out / 'recipe.yaml'})")
        self.method.load_state_dict(ckpt["method"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["torch_rng"])
        self.step, self.epoch, self.batch_in_epoch = ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"]
        self.history = json.loads(ckpt["history"])
        self.skipped_files = ckpt["skipped_files"]
        self.train_seconds = float(ckpt.get("train_seconds", 0.0))
        self.hardware = json.loads(ckpt.get("hardware", "[]"))
        # Steps logged after this checkpoint (before a kill) are re-run: drop them from the log.
        metrics = self.out / "metrics.jsonl"
        if self.rank == 0 and metrics.exists():
            kept = [ln for ln in metrics.read_text().splitlines() if _logged_at_or_before(ln, self.step)]
            atomic_write_text(metrics, "".join(ln + "\n" for ln in kept))
        log.info("resumed %s at step %d (epoch %d, batch %d)", self.out, self.step, self.epoch, self.batch_in_epoch)

    # ---------------------------------------------------------------- logging
    def _log(self, record: dict[str, Any]) -> None:
        if self.rank != 0:
            return
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tensorboard is None:
            try:  # TensorBoard only when installed; metrics.jsonl is the record either way
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:
                self._tensorboard = False
        if self._tensorboard:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self._tensorboard.add_scalar(key, value, record["step"])

    # ---------------------------------------------------------------- one step
    def _set_lr(self) -> float:
        factor = lr_factor(self.step, self.total_steps, self.plan.batches_per_epoch, self.recipe.get("schedule", {}))
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = base * factor
        return self.optimizer.param_groups[0]["lr"]

    def _autocast(self):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def train_step(self, images: torch.Tensor) -> tuple[float, dict[str, float]]:
        t0 = time.perf_counter()
        images = images.to(self.device, non_blocking=True)
        batch = self.augment(images, _step_generator(self.seed, self.step, 1))
        if self.channels_last:
            batch.views = [v.contiguous(memory_format=torch.channels_last) for v in batch.views]
        _sync(self.device)
        t1 = time.perf_counter()
        batch.generator = _step_generator(self.seed, self.step, 2)
        batch.step, batch.total_steps = self.step, self.total_steps
        lr = self._set_lr()
        self.method.train()
        with self._autocast():
            loss, logs = self.model(batch)
        _sync(self.device)
        t2 = time.perf_counter()
        if not torch.isfinite(loss):
            raise TrainingDiverged(
                f"loss is {loss.item()} at step {self.step}; the last good checkpoint is "
                f"{self.out / CHECKPOINT_FILE}: lower optim.lr or raise warm-up, then `zoo train --resume {self.out}`")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.method.parameters(), float(
            self.recipe["train"].get("clip_grad", float("inf"))))
        if not torch.isfinite(grad_norm):
            raise TrainingDiverged(
                f"gradient is {grad_norm.item()} at step {self.step}; the last good checkpoint is "
                f"{self.out / CHECKPOINT_FILE}: lower optim.lr, then `zoo train --resume {self.out}`")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.method.after_optimizer_step(self.step, self.total_steps)
        _sync(self.device)
        t3 = time.perf_counter()
        self.last_timing = {"augment": t1 - t0, "forward": t2 - t1, "backward_update": t3 - t2}
        out = {k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in logs.items()}
        out["lr"], out["grad_norm"] = lr, float(grad_norm)
        out["augment_share"] = (t1 - t0) / (t3 - t0)
        return float(loss.detach()), out

    # ---------------------------------------------------------------- k-NN monitor
    @torch.no_grad()
    def knn_monitor(self) -> float:
        """Weighted k-NN (cosine, k=20, T=0.07) of backbone features: train subset as bank, test subset as queries."""
        ecfg = self.recipe.get("eval", {})
        bank_ds, test_ds = build_dataset(self.recipe["data"], "labelled"), build_dataset(self.recipe["data"], "test")
        bank_x, bank_y = _subset(bank_ds, int(ecfg.get("knn_bank", 10000)))
        test_x, test_y = _subset(test_ds, int(ecfg.get("knn_queries", 2000)))
        size = int(ecfg.get("input_size", self.augment.pipelines[0].crop_size))
        preprocess = Preprocess(size, int(ecfg.get("resize_size", size)), self.mean, self.std)
        backbone = self.method.backbone
        was_training = backbone.training
        backbone.eval()

        def embed(x: torch.Tensor) -> torch.Tensor:
            # The bare loop, not zoo.embed.embed: the training backbone (no spec, so no runner or frozen graph;
            # a runner would also convert it to channels_last in place) in the recipe's autocast, on its device.
            with self._autocast():
                return run_chunks(lambda batch: backbone(batch.to(self.device)), preprocess, x, 512)

        acc = knn_accuracy(embed(bank_x), bank_y, embed(test_x), test_y, k=int(ecfg.get("knn_k", 20)),
                           temperature=float(ecfg.get("knn_t", 0.07)))
        backbone.train(was_training)
        return acc

    # ---------------------------------------------------------------- loop
    @property
    def finished(self) -> dict[str, Any] | None:
        """The final record of a run that already ended (resumed again), else None."""
        return next((r for r in reversed(self.history) if r.get("final")), None)

    def fit(self) -> dict[str, Any]:
        if self.finished is not None:  # --resume of a finished run: nothing to add, no second final record
            log.info("%s already finished at step %d; nothing to resume", self.out, self.finished["step"])
            return self.finished
        tcfg = self.recipe["train"]
        ckpt_every = int(tcfg.get("checkpoint_every", 200))
        log_every = int(tcfg.get("log_every", 10))
        knn_every = int(self.recipe.get("eval", {}).get("knn_every", 1))
        global_batch = self.plan.global_batch
        bar = None
        if self.progress and self.rank == 0:
            from tqdm import tqdm

            bar = tqdm(total=self.total_steps, initial=self.step, desc=self.recipe["method"]["name"],
                       unit="step", dynamic_ncols=True, file=sys.stderr)
        if self.step == 0:
            if knn_every:  # the randomly initialised backbone: the baseline the monitor must rise above
                record = {"step": 0, "epoch": 0, "knn_top1": self.knn_monitor()}
                self.history.append(record)
                self._log(record)
                if bar is not None:
                    bar.write(f"initial (random) backbone: k-NN top-1 {record['knn_top1']:.2f}")
            self.save()  # step-0 checkpoint: a run killed before its first save can still --resume
        here = describe_hardware(self.device, self.world)
        if here not in self.hardware:
            self.hardware.append(here)
        t_last, n_last = time.time(), 0
        self._fit_started = time.time()
        stop = False
        while self.epoch < self.epochs and not stop:
            for images, _, skipped in iterate_batches(self.dataset, self.plan, self.epoch, self.batch_in_epoch,
                                                       int(self.recipe["data"].get("workers", 0))):
                if self.step >= self.total_steps:
                    stop = True
                    break
                self.skipped_files += skipped
                loss, logs = self.train_step(images)
                self.step += 1
                self.batch_in_epoch += 1
                n_last += global_batch
                if self.step % log_every == 0 or self.step == self.total_steps:
                    now = time.time()
                    ips = n_last / max(now - t_last, 1e-9)
                    t_last, n_last = now, 0
                    self._log({"step": self.step, "epoch": self.epoch, "loss": loss, "images_per_s": ips, **logs})
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{logs['lr']:.3g}", img_s=f"{ips:.0f}")
                if bar is not None:
                    bar.update(1)
                if self.step % ckpt_every == 0:
                    self.save()
            else:
                self.epoch += 1
                self.batch_in_epoch = 0
                record: dict[str, Any] = {"step": self.step, "epoch": self.epoch, "skipped_files": self.skipped_files}
                if knn_every and self.epoch % knn_every == 0:
                    record["knn_top1"] = self.knn_monitor()
                    if bar is not None:
                        bar.write(f"epoch {self.epoch}: k-NN top-1 {record['knn_top1']:.2f}")
                self.history.append(record)
                self._log(record)
                self.save()
        if bar is not None:
            bar.close()
        final = {"step": self.step, "epoch": self.epoch, "knn_top1": self.knn_monitor(), "final": True,
                 "train_minutes": round(self._elapsed() / 60, 2)}
        self.history.append(final)
        self._log(final)
        self.save()
        if self.skipped_files:
            log.warning("skipped %d unreadable image files", self.skipped_files)
        return final


def train(recipe: dict[str, Any], out_dir: str | os.PathLike, resume: bool = False, progress: bool = True
          ) -> dict[str, Any]:
    """Run a recipe to the end (or resume it); returns the final k-NN record."""
    trainer = Trainer(recipe, out_dir, resume=resume, progress=progress)
    # SIGTERM (e.g. a scheduler's preemption): leave through the normal exception path.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    return trainer.fit()

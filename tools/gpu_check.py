"""One GPU check, in a few minutes: every method trains, every backend and precision embeds, the precision checks
and a GPU index run, and one table says what held and how fast.

    tools/gpu_check.sh                 # on a machine with a GPU (CUDA); prints a markdown table
    python3 tools/gpu_check.py --quick # the same logic on CPU with tiny sizes (what CI's test runs)

Every row is measured in this run; nothing is read from earlier runs. A step that fails prints its one-line
error in the table and the check goes on, so one broken path does not hide the others.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a clone without installing

from zoo.registry import METHODS  # noqa: E402 - after the path line above


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"


def _row(label: str, measure: Callable[[], tuple[bool, str]]) -> dict[str, Any]:
    """One table row: `measure()` gives (ok, result); an exception becomes a failed row and the check goes on."""
    try:
        ok, result = measure()
    except Exception as e:  # noqa: BLE001 - reported in the table
        ok, result = False, _one_line(e)
    return {"check": label, "ok": ok, "result": result}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds per call after one warm-up call, synchronising the device around each call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def check_training(device: torch.device, steps: int, batch: int | None) -> list[dict[str, Any]]:
    """Each method's Fashion-MNIST recipe for `steps` steps in bf16 autocast + channels-last."""
    from training.recipe import load_recipe
    from training.trainer import Trainer

    rows = []
    for method in METHODS:
        overrides = [f"train.max_steps={steps}", "eval.knn_every=0", "train.precision=bf16",
                     "train.channels_last=true", f"train.checkpoint_every={10 ** 9}", f"train.log_every={steps}"]
        if batch:
            overrides.append(f"data.batch_size={batch}")

        def measure() -> tuple[bool, str]:
            recipe = load_recipe(ROOT / "training" / "recipes" / method / "fmnist.yaml", overrides)
            with tempfile.TemporaryDirectory() as tmp:
                trainer = Trainer(recipe, tmp, progress=False)
                t0 = time.perf_counter()
                final = trainer.fit()
                _sync(device)
                seconds = time.perf_counter() - t0
            return final["step"] == steps, (f"{steps * trainer.plan.global_batch / seconds:.0f} img/s (batch "
                                            f"{trainer.plan.global_batch}, incl. the first steps' warm-up)")

        rows.append(_row(f"train {method}, {steps} steps, bf16 + channels-last", measure))
    return rows


def check_compile(methods: tuple[str, ...], steps: int, batch: int | None = None,
                  dataset: str | None = None) -> list[dict[str, Any]]:
    """`zoo bench train --compile-mode reduce-overhead` (CUDA graphs on top of inductor) on a few recipes."""
    from zoo_cli.bench.train import bench_train

    def measure(method: str) -> tuple[bool, str]:
        (r,) = bench_train([method], steps=steps, batch_size=batch, dataset=dataset, compile_mode="reduce-overhead")
        return r["compile_speedup"] > 0, (f"{r['compiled_images_per_s']:.0f} img/s, {r['compile_speedup']:.2f}x "
                                          f"eager's step (batch {r['batch']}), after {r['compile_s']:.0f} s compiling")

    return [_row(f"train.compile reduce-overhead, {m}", lambda m=m: measure(m)) for m in methods]


def check_embedding(device: torch.device, image_size: int, n_images: int, batch: int) -> list[dict[str, Any]]:
    """zoo.embed img/s beside the bare model on ready batches (the pipeline's efficiency), per backend/precision."""
    from dataclasses import replace

    import zoo
    from zoo.datasets import load_fashion_mnist
    from zoo.preprocess import Preprocess

    images = load_fashion_mnist("test")[0][:n_images]
    rows = []
    model = zoo.load("wmse-resnet50", pretrained=False, device=str(device))
    model.spec = replace(model.spec, input_size=image_size, resize_size=image_size)
    model.preprocess = Preprocess.from_spec(model.spec)
    ready = [model.preprocess(images[i:i + batch, None]).to(device).contiguous(memory_format=torch.channels_last)
             for i in range(0, len(images), batch)]
    bare_model = model.to(memory_format=torch.channels_last)

    def bare() -> None:
        with torch.inference_mode():
            for x in ready:
                bare_model(x)

    bare_s = _timed(bare, device, 3)
    rows.append({"check": f"bare forward, ResNet-50 {image_size} px, fp32, batch {batch}", "ok": True,
                 "result": f"{n_images / bare_s:.0f} img/s (ready {device.type} batches)"})
    for backend, precision in (("torch", "fp32"), ("torch", "bf16"), ("onnxruntime", "fp32")):
        def measure(backend: str = backend, precision: str = precision) -> tuple[bool, str]:
            seconds = _timed(lambda: zoo.embed(model, images, batch_size=batch, device=device, backend=backend,
                                               precision=precision, progress=False), device, 2)
            ratio = f"; {bare_s / seconds:.2f}x the bare fp32 forward" if precision == "fp32" and backend == "torch" \
                else ""
            return True, f"{n_images / seconds:.0f} img/s{ratio}"

        rows.append(_row(f"zoo.embed uint8 tensors, backend={backend} {precision}", measure))
    return rows


def check_precisions(device: torch.device, sizes: tuple[int, int]) -> list[dict[str, Any]]:
    """The bf16 / int8 quality checks of a shipped model, with the model on `device`."""
    import zoo
    from zoo.precision import check_precision, describe

    model = zoo.load("equimod-byol-resnet18_narrow.fmnist", device=str(device))

    def measure(precision: str) -> tuple[bool, str]:
        entry = check_precision(model, precision, force=True, sizes=sizes, verbose=False)
        return True, ("accepted: " if entry["accepted"] else "refused: ") + describe(entry)

    return [_row(f"precision check {p} (equimod-byol narrow, {sizes[0]} bank / {sizes[1]} queries)",
                 lambda p=p: measure(p)) for p in ("bf16", "int8")]


def check_index(device: torch.device, n: int, dim: int) -> list[dict[str, Any]]:
    """A flat cosine index on the GPU when faiss has GPU support (the `gpu` extra), else says why not."""
    import numpy as np

    import zoo

    def measure() -> tuple[bool, str]:
        import faiss

        gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
        x = np.random.default_rng(0).standard_normal((n, dim), dtype=np.float32)
        index = zoo.Index(dim, metric="cosine", device="auto")
        index.add(x, list(range(n)))
        seconds = _timed(lambda: index.search(x[:1000], k=10), device, 3)
        where = "GPU" if gpus and device.type == "cuda" else f"CPU (faiss GPUs: {gpus})"
        return True, f"{1000 / seconds:.0f} queries/s on {where}"

    return [_row(f"Index(device='auto') flat cosine, {n} x {dim}, 1000 queries k=10", measure)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke run)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "CPU"
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if args.quick:
        rows += check_training(device, steps=2, batch=128)  # W-MSE whitens sub-batches of 128
        rows += check_embedding(device, image_size=32, n_images=64, batch=32)
        rows += check_precisions(device, sizes=(200, 100))
        rows += check_index(device, n=2000, dim=32)
    else:
        rows += check_training(device, steps=50, batch=None)
        rows += check_compile(("simclr", "wmse"), steps=20)
        rows += check_embedding(device, image_size=224, n_images=2048, batch=256)
        rows += check_precisions(device, sizes=(10000, 2000))
        rows += check_index(device, n=1_000_000, dim=128)
    print(f"\nGPU check {time.strftime('%Y-%m-%d')} on {name} (torch {torch.__version__}), "
          f"{time.perf_counter() - started:.0f} s\n")
    print("| check | ok | result |\n|---|---|---|")
    for row in rows:
        print(f"| {row['check']} | {'yes' if row['ok'] else '**no**'} | {row['result']} |")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

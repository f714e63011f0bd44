"""`zoo bench embed` (pipeline part): the whole `zoo.embed` call beside the bare model on the same images.

The bare forward is the fastest of eager NCHW, eager channels-last and our frozen graph (each under
inference_mode) on batches already preprocessed and on the model's device; its img/s is what the model
alone can do. `zoo.embed` is then timed on the same images given as a uint8 tensor, as a list of PIL
images and as a folder of JPEGs: the ratio is the pipeline's efficiency (decode, preprocess, copies).
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from zoo_cli.bench.timing import median_time, say

# What the pipeline must keep of the bare forward (issue #32): tensors 0.8, decoded inputs 0.5.
GOALS = {"uint8 tensor": 0.8, "list of PIL images": 0.5, "folder of JPEGs": 0.5}


def _bare_forwards(model: torch.nn.Module, ready: list[torch.Tensor]) -> dict[str, Callable[[], Any]]:
    from zoo.runners import TorchRunner

    eager = copy.deepcopy(model).eval()
    channels_last = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    ready_cl = [x.contiguous(memory_format=torch.channels_last) for x in ready]
    frozen = TorchRunner(copy.deepcopy(model).eval(), ready[0].device, "fp32")

    def run(net: Callable, batches: list[torch.Tensor]) -> Callable[[], Any]:
        def go() -> None:
            with torch.inference_mode():
                for x in batches:
                    net(x)
            if ready[0].is_cuda:
                torch.cuda.synchronize()
        return go

    forwards = {"eager NCHW": run(eager, ready), "eager channels-last": run(channels_last, ready_cl)}
    if frozen.graph is not None:
        forwards["frozen graph"] = run(frozen, ready)
    return forwards


def bench_pipeline(model: torch.nn.Module, images: torch.Tensor, batch_size: int, repeats: int = 2
                   ) -> dict[str, float]:
    """Print and return img/s of the bare forwards and of `zoo.embed` per input kind, with the ratios."""
    import zoo
    from PIL import Image

    n = len(images)
    device = next(model.parameters()).device
    ready = [model.preprocess(images[i:i + batch_size, None]).to(device) for i in range(0, n, batch_size)]
    rates: dict[str, float] = {}
    for label, fn in _bare_forwards(model, ready).items():
        rates[f"bare {label}"] = n / median_time(fn, repeats)
    best_label = max(rates, key=rates.get)
    best = rates[best_label]
    pil = [Image.fromarray(a.numpy()) for a in images]
    with tempfile.TemporaryDirectory() as folder:
        for i, im in enumerate(pil):
            im.save(Path(folder) / f"{i:06d}.jpg", quality=95)
        inputs = {"uint8 tensor": images, "list of PIL images": pil, "folder of JPEGs": folder}
        for kind, data in inputs.items():
            def call(data: Any = data) -> None:
                zoo.embed(model, data, batch_size=batch_size, device=device, progress=False)
            rates[f"zoo.embed {kind}"] = n / median_time(call, repeats)
            if kind != "uint8 tensor":  # what decoding alone allows: the ceiling of the ratio for small models
                rates[f"decode {kind}"] = n / median_time(lambda data=data: _decode_only(model, data, batch_size),
                                                          repeats)
    say(f"  pipeline: {n} images, batch {batch_size}, on {device}; bare forward on ready batches:")
    for label, rate in rates.items():
        if label.startswith("bare"):
            say(f"    {label:36s} {rate:8.1f} img/s{'   <- best' if label == best_label else ''}")
    for kind, goal in GOALS.items():
        rate = rates[f"zoo.embed {kind}"]
        met = rate / best >= goal
        decode = rates.get(f"decode {kind}")
        # On a CPU the decoding workers and the model share the cores: at best their times add up.
        shared = None if decode is None else 1 / (1 / decode + 1 / best)
        why = "" if met or decode is None else (
            f"; decoding + preprocessing alone runs {decode:.0f} img/s, so on shared cores the bound is "
            f"{shared:.0f} img/s = {shared / best:.2f}x")
        say(f"    zoo.embed, {kind:25s} {rate:8.1f} img/s   {rate / best:.2f}x the best bare forward "
            f"(goal >= {goal}: {'MET' if met else 'NOT MET'}{why})")
    return rates


def _decode_only(model: torch.nn.Module, inputs: Any, batch_size: int) -> None:
    """`zoo.embed`'s input side alone (sources, workers, preprocessing), no model: the pipeline's ceiling."""
    from zoo.embed import _loader, default_workers, prepare

    _, source, bs = prepare(model, inputs, None, "avg", "torch", "fp32", None, 10 ** 9, batch_size)
    batches = [list(range(s, min(s + bs, len(source)))) for s in range(0, len(source), bs)]
    for _ in _loader(source, batches, default_workers(source, len(batches))):
        pass

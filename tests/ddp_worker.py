"""One forward/backward of a method on a fixed batch, in one process or under torchrun (gloo).

Usage: ddp_worker.py METHOD HPARAMS_JSON OUT_JSON. Rank r takes the r-th contiguous slice of the
batch, as the trainer's BatchPlan does; rank 0 writes the loss and a slice of the averaged gradient.
"""

import json
import sys

import torch

from training.methods import get_method_class
from training.distributed import gather_no_grad
from training.trainer import wrap_distributed
from training.views import Views
from zoo import distributed as zoo_dist
from zoo.backbones import create_backbone

BATCH = 16


def main() -> None:
    name, hparams, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    torch.set_num_threads(1)
    device = zoo_dist.init_from_env()
    rank, world = zoo_dist.rank(), zoo_dist.world_size()
    result = {"world": world}
    # fp32: the loss as training computes it; fp64: gradients without the float noise a deep BN net amplifies.
    for dtype in (torch.float32, torch.float64):
        torch.manual_seed(0)
        method = get_method_class(name).from_config(create_backbone("resnet18_narrow"), hparams).to(dtype)
        g = torch.Generator().manual_seed(1)
        views = [torch.randn(BATCH, 3, 28, 28, generator=g, dtype=dtype) for _ in range(2)]
        local = BATCH // world
        batch = Views(views=[v[rank * local:(rank + 1) * local] for v in views],
                      generator=torch.Generator().manual_seed(2), step=0, total_steps=10)
        method, model = wrap_distributed(method.to(device), device)
        method.train()
        loss, _ = model(batch)
        loss.backward()
        grad = method.backbone.conv1.weight.grad.flatten()[:64]
        # Per-sample losses (BYOL) are means over the local slice: the global loss is their average.
        reported = gather_no_grad(loss.detach()[None]).mean()
        result[str(dtype)] = {"loss": reported.item(), "grad": grad.tolist()}
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    if zoo_dist.is_distributed():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()

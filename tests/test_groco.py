import math

import pytest
import torch
import torch.nn.functional as F

from training.methods.groco import MAX_SORTER_SIZE, GroCo, groco_loss, soft_permutation, sorting_loss
from training.views import Views
from zoo.backbones import create_backbone

pytest.importorskip("diffsort")


def test_correctly_ordered_group_has_lower_loss_than_reversed_one():
    neg = torch.tensor([[-0.5, -0.2, 0.0], [-0.3, 0.1, 0.2]])
    pos = torch.tensor([[0.6, 0.9], [0.5, 0.8]])
    good, _ = sorting_loss(neg, pos, sorters={})
    # Reversed: the negatives now the most similar, the positives the least (each block ascending).
    bad, _ = sorting_loss(torch.tensor([[0.5, 0.7, 0.9], [0.4, 0.6, 0.8]]), torch.tensor([[-0.5, -0.2], [-0.3, 0.1]]),
                          sorters={})
    assert good < bad

    # The same through groco_loss: positives near-copies of the anchor vs. anti-aligned copies.
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 16, generator=g)
    aligned = groco_loss([z, z + 0.05 * torch.randn(8, 16, generator=g)], topk_neg=3, sorters={})
    reversed_ = groco_loss([z, -z], topk_neg=3, sorters={})
    assert aligned < reversed_


def test_soft_permutation_is_doubly_stochastic():
    sims = torch.randn(5, 7, dtype=torch.float64)
    perm = soft_permutation(sims, steepness=1.0, sorters={})
    assert perm.shape == (5, 7, 7) and (perm >= 0).all()
    torch.testing.assert_close(perm.sum(-1), torch.ones(5, 7, dtype=torch.float64))
    torch.testing.assert_close(perm.sum(-2), torch.ones(5, 7, dtype=torch.float64))
    # diffsort's convention: sims @ P is the soft-sorted vector; a steep sorter approaches the hard sort.
    steep = soft_permutation(sims, steepness=1e4, sorters={})
    torch.testing.assert_close((sims.unsqueeze(1) @ steep).squeeze(1), sims.sort(1).values, atol=1e-3, rtol=0)


def test_groco_loss_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    views = [torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(2)]
    # stop_grad=False: with stop_grad the analytic gradient deliberately omits the detached paths,
    # so finite differences would (rightly) disagree; this checks every path, sorter included.
    assert torch.autograd.gradcheck(lambda a, b: groco_loss([a, b], topk_neg=2, stop_grad=False, sorters={}), views)
    assert groco_loss(views, topk_neg=2).dtype == torch.float64


def test_sorter_lives_on_inputs_device_and_loss_is_fp32_under_bf16_autocast():
    devices = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        lin = torch.nn.Linear(16, 16).to(device)
        sorters: dict = {}
        with torch.autocast(device_type="cpu" if device == "meta" else device, dtype=torch.bfloat16):
            views = [lin(torch.randn(8, 16, device=device)) for _ in range(2)]
            loss = groco_loss(views, topk_neg=3, sorters=sorters)
        if device != "meta":
            assert views[0].dtype == torch.bfloat16
            assert torch.isfinite(loss)
        assert loss.dtype == torch.float32
        (n, _, sorter_device, dtype), sorter = next(iter(sorters.items()))
        assert n == 4 and dtype == torch.float32 and sorter_device == views[0].device
        assert all(m.device == views[0].device for layer in sorter.sorting_network for m in layer)


def test_topk_neg_guard_refuses_huge_sorting_networks():
    views = [torch.randn(200, 8) for _ in range(2)]
    with pytest.raises(ValueError, match=r"sorting network of \d+ wires.*topk_neg <="):
        groco_loss(views, topk_neg=MAX_SORTER_SIZE)
    with pytest.raises(ValueError, match="sorting network"):
        GroCo(create_backbone("resnet18_narrow"), topk_neg=100, proj_hidden=8, proj_dim=8)
    with pytest.raises(ValueError, match="at least 11 images"):
        groco_loss([torch.randn(6, 8) for _ in range(2)], topk_neg=10)


def test_fewer_global_views_than_views_makes_locals_anchors_with_all_globals_as_positives():
    g = torch.Generator().manual_seed(2)
    views = [torch.randn(6, 8, generator=g, requires_grad=True) for _ in range(4)]
    sorters: dict = {}
    loss = groco_loss(views, topk_neg=3, n_global=2, sorters=sorters)
    # Global anchors: 1 positive (k+1 wires); local anchors: both globals (k+2 wires).
    assert sorted(key[0] for key in sorters) == [4, 5]
    loss.backward()
    assert all(v.grad is not None and torch.isfinite(v.grad).all() for v in views)

    torch.testing.assert_close(loss.detach(), _by_definition(views, k=3, n_global=2).detach())


def _by_definition(views: list[torch.Tensor], k: int, n_global: int) -> torch.Tensor:
    """The loss written out per anchor, gradient through the anchor only (stop_grad)."""
    terms = []
    for a, v in enumerate(views):
        anchor = F.normalize(v, dim=1)
        others = [F.normalize(u.detach(), dim=1) for u in views]
        pos = torch.stack([(anchor * others[j]).sum(1) for j in range(n_global) if j != a], 1).sort(1).values
        neg = (anchor @ others[a].T).masked_fill(torch.eye(len(v), dtype=torch.bool), -math.inf)
        terms.append(sorting_loss(neg.topk(k, dim=1).values.flip(1), pos, sorters={})[0])
    return torch.stack(terms).mean()


def test_stop_grad_sends_gradient_through_the_anchor_only():
    g = torch.Generator().manual_seed(3)
    views = [torch.randn(6, 8, generator=g, requires_grad=True) for _ in range(3)]
    got = torch.autograd.grad(groco_loss(views, topk_neg=2), views)
    want = torch.autograd.grad(_by_definition(views, k=2, n_global=3), views)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)
    full = torch.autograd.grad(groco_loss(views, topk_neg=2, stop_grad=False), views)
    assert not torch.allclose(full[0], got[0])


def _views(batch: int, sizes: list[int], seed: int) -> Views:
    g = torch.Generator().manual_seed(seed)
    return Views(views=[torch.randn(batch, 3, s, s, generator=g) for s in sizes],
                 generator=torch.Generator().manual_seed(0), step=seed, total_steps=10)


def test_groco_method_trains_two_steps_with_global_and_local_crops(one_thread):
    model = GroCo(create_backbone("resnet18_narrow"), topk_neg=3, n_global=2, proj_hidden=32, proj_dim=16)
    frozen_bias = model.projector[-2].bias.detach().clone()
    assert isinstance(model.projector[-1], torch.nn.BatchNorm1d) and not model.projector[-1].affine
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(2):
        loss, logs = model(_views(8, [28, 28, 16, 16], step))
        assert torch.isfinite(loss) and loss.dtype == torch.float32
        assert {"loss", "q_pos", "order_acc"} <= logs.keys()
        opt.zero_grad()
        loss.backward()
        assert model.backbone.conv1.weight.grad.abs().sum() > 0
        opt.step()
        model.after_optimizer_step(step, 10)
    assert torch.equal(model.projector[-2].bias, frozen_bias)
    assert not any("sort" in k for k in model.state_dict())


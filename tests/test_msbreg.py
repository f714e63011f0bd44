import pytest
import torch
import torch.nn.functional as F

from training.methods.msbreg import (MSBReg, brownian_loss, centroid_loss, effective_rank, random_directions,
                                     singular_value_loss)
from training.views import Views
from zoo.backbones import create_backbone


def _flat(n: int, d: int, seed: int = 0, center: bool = True) -> torch.Tensor:
    """[n, d] with orthogonal, equal-norm (and, if `center`, zero-mean) columns: a flat spectrum."""
    a = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if center:
        a = a - a.mean(0)
    return torch.linalg.qr(a).Q * 3.0


def test_singular_value_loss_is_zero_for_a_flat_spectrum_and_larger_when_rank_deficient():
    flat = _flat(32, 8)
    assert singular_value_loss(flat).abs() < 1e-10
    assert singular_value_loss(_flat(32, 8, center=False), center=False).abs() < 1e-10
    g = torch.Generator().manual_seed(1)
    generic = torch.randn(32, 8, generator=g, dtype=torch.float64)
    low_rank = torch.randn(32, 2, generator=g, dtype=torch.float64) @ torch.randn(2, 8, generator=g,
                                                                                  dtype=torch.float64)
    rank_one = torch.randn(32, 1, generator=g, dtype=torch.float64) @ torch.randn(1, 8, generator=g,
                                                                                 dtype=torch.float64)
    values = [singular_value_loss(x).item() for x in (flat, generic, low_rank, rank_one)]
    assert values == sorted(values) and values[1] > 1e-3
    assert values[3] == pytest.approx(1 - 1 / 8)  # rank one: the maximum, 1 - 1/r
    assert singular_value_loss(5 * generic).item() == pytest.approx(values[1])  # scale-invariant
    # A centred batch of N <= D has rank N - 1: flat over those N - 1 values is the minimum.
    rotation = torch.linalg.qr(torch.randn(32, 7, generator=g, dtype=torch.float64)).Q.T  # [7, 32], orthonormal rows
    wide = _flat(8, 7) @ rotation
    assert wide.shape == (8, 32) and singular_value_loss(wide).abs() < 1e-10
    assert singular_value_loss(torch.randn(8, 32, generator=g, dtype=torch.float64)) > 1e-3


def test_brownian_loss_has_zero_mean_over_random_directions_and_is_minus_one_along_the_embedding():
    z = torch.randn(64, 16)
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([brownian_loss(z, random_directions(64, 16, g)) for _ in range(500)])
    # Each draw is a mean of 64 projections with variance 1/16: std of the mean over 500 draws ~ 1.6e-3.
    assert draws.mean().abs() < 0.01 and draws.std() > 0.01
    assert brownian_loss(z, F.normalize(z, dim=1)).item() == pytest.approx(-1.0)
    d = random_directions(10, 5, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert d.dtype == torch.float64
    torch.testing.assert_close(d.norm(dim=1), torch.ones(10, dtype=torch.float64))


def test_random_directions_come_from_the_generator_only():
    a = random_directions(4, 3, torch.Generator().manual_seed(5))
    torch.manual_seed(123)  # the global RNG must not matter
    b = random_directions(4, 3, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)


def test_centroid_loss_is_zero_when_each_view_agrees_with_the_other_views_target_centroid():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 8, generator=g)
    # Every view of an image points the same way (targets a positive rescaling): zero.
    q = [(s * x).requires_grad_() for s in (1.0, 0.5, 3.0)]
    t = [(2.0 * x).requires_grad_() for _ in range(3)]
    assert centroid_loss(q, t).abs() < 1e-6
    t_other = [torch.randn(6, 8, generator=g, requires_grad=True) for _ in range(3)]
    loss = centroid_loss(q, t_other)
    assert 0 < loss < 4
    loss.backward()
    assert all(v.grad is not None for v in q)
    assert all(v.grad is None for v in t_other)


def test_centroid_loss_gives_no_credit_for_matching_only_the_views_own_target():
    # The shortcut of a first reading (all views in both centroids): the predictor copies each view's own
    # target embedding. With different views that must cost as much as BYOL's cross-view term, not zero.
    g = torch.Generator().manual_seed(0)
    z = [torch.randn(16, 8, generator=g) for _ in range(2)]
    own = centroid_loss([v.clone() for v in z], z)
    byol = torch.stack([2 - 2 * F.cosine_similarity(z[0], z[1], dim=1)] * 2).mean()
    torch.testing.assert_close(own, byol)
    assert own > 0.5
    # K = 3: view k's target is the mean of the other two normalised target views.
    q = [torch.randn(16, 8, generator=g) for _ in range(3)]
    t = [torch.randn(16, 8, generator=g) for _ in range(3)]
    n = [F.normalize(v, dim=1) for v in t]
    by_hand = torch.stack([2 - 2 * F.cosine_similarity(q[0], (n[1] + n[2]) / 2, dim=1),
                           2 - 2 * F.cosine_similarity(q[1], (n[0] + n[2]) / 2, dim=1),
                           2 - 2 * F.cosine_similarity(q[2], (n[0] + n[1]) / 2, dim=1)]).mean()
    torch.testing.assert_close(centroid_loss(q, t), by_hand)
    with pytest.raises(ValueError, match="K >= 2"):
        centroid_loss([q[0]], [t[0]])


def test_effective_rank_is_d_for_a_flat_spectrum_and_one_for_rank_one():
    assert effective_rank(_flat(32, 8, center=False)).item() == pytest.approx(8.0)
    rank_one = torch.randn(32, 1) @ torch.randn(1, 8)
    assert effective_rank(rank_one).item() == pytest.approx(1.0, abs=1e-3)
    # Complete collapse (identical rows) reads 1 uncentred.
    assert effective_rank(torch.ones(16, 8) + 1e-7 * torch.randn(16, 8)).item() == pytest.approx(1.0, abs=1e-3)


def test_each_term_passes_gradcheck_in_float64():
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)

    q1, q2, t1, t2 = rnd(5, 4), rnd(5, 4), rnd(5, 4), rnd(5, 4)
    assert torch.autograd.gradcheck(lambda a, b: centroid_loss([a, b], [t1, t2]), (q1, q2))
    z = rnd(7, 4)
    assert torch.autograd.gradcheck(lambda x: singular_value_loss(x), (z,))
    assert torch.autograd.gradcheck(lambda x: singular_value_loss(x, normalize=True), (z,))
    assert torch.autograd.gradcheck(lambda x: singular_value_loss(x, center=False), (z,))
    dirs = random_directions(7, 4, g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: brownian_loss(x, dirs), (z,))
    assert torch.autograd.gradcheck(lambda x: effective_rank(x), (z,))


def _views(batch: int, sizes: list[int], seed: int) -> Views:
    g = torch.Generator().manual_seed(seed)
    return Views(views=[torch.randn(batch, 3, s, s, generator=g) for s in sizes],
                 generator=torch.Generator().manual_seed(seed), step=seed, total_steps=10)


@pytest.mark.parametrize("heads_bn", [True, False])
def test_msbreg_method_trains_two_steps_and_moves_the_ema_target(heads_bn, one_thread):
    model = MSBReg(create_backbone("resnet18_narrow"), proj_hidden=32, proj_dim=16, pred_hidden=32,
                   heads_bn=heads_bn, base_momentum=0.9)
    has_bn = any(isinstance(m, torch.nn.BatchNorm1d) for m in [*model.projector, *model.predictor])
    assert has_bn == heads_bn
    assert not any(p.requires_grad for p in [*model.target_backbone.parameters(),
                                              *model.target_projector.parameters()])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    target_before = model.target_projector[0].weight.clone()
    for step in range(2):
        loss, logs = model(_views(8, [28, 28, 16], step))
        assert torch.isfinite(loss) and loss.dtype == torch.float32
        assert {"loss", "centroid", "sv", "brownian", "effective_rank"} <= logs.keys()
        assert 1.0 <= logs["effective_rank"] <= 8.0
        opt.zero_grad()
        loss.backward()
        assert model.backbone.conv1.weight.grad.abs().sum() > 0
        assert model.target_backbone.conv1.weight.grad is None
        opt.step()
        model.after_optimizer_step(step, 10)
    assert not torch.equal(model.target_projector[0].weight, target_before)
    assert not torch.equal(model.target_projector[0].weight, model.projector[0].weight)
    assert any(k.startswith("target_backbone.") for k in model.state_dict())


def test_terms_run_in_fp32_under_bf16_autocast():
    lin = torch.nn.Linear(8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = lin(torch.randn(16, 8))
        q = lin(torch.randn(16, 8))
        assert z.dtype == torch.bfloat16
        terms = [centroid_loss([q, z], [z, q]), singular_value_loss(z, normalize=True), effective_rank(z),
                 brownian_loss(z, random_directions(16, 8, torch.Generator().manual_seed(0)))]
    assert all(t.dtype == torch.float32 and torch.isfinite(t) for t in terms)

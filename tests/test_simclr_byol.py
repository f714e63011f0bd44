"""SimCLR's NT-Xent, BYOL's loss and EMA target, and both methods end to end on a tiny backbone."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from training.methods import get_method_class
from training.methods.base import SSLMethod
from training.methods.byol import BYOL, byol_loss
from training.methods.simclr import SimCLR, nt_xent_loss
from training.views import Views
from zoo.backbones import create_backbone


pytestmark = pytest.mark.usefixtures("one_thread")


def _nt_xent_by_hand(z1: torch.Tensor, z2: torch.Tensor, t: float) -> float:
    """Cross-entropy written out in float64 Python: rows of [z1; z2], positive i <-> i+N."""
    u = [r.tolist() for r in torch.cat([z1, z2]).double()]
    n2 = len(u)

    def cos(a: list[float], b: list[float]) -> float:
        dot = sum(x * y for x, y in zip(a, b))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    total = 0.0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        others = [cos(u[i], u[k]) / t for k in range(n2) if k != i]
        m = max(others)
        logsumexp = m + math.log(sum(math.exp(s - m) for s in others))
        total += -(cos(u[i], u[pos]) / t - logsumexp)
    return total / n2


def test_nt_xent_matches_cross_entropy_written_by_hand():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    for t in (0.1, 0.5, 2.0):
        got = nt_xent_loss(z1.double(), z2.double(), t)
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(_nt_xent_by_hand(z1, z2, t), rel=1e-12, abs=1e-12)


def test_nt_xent_hand_checkable_values():
    # N = 1: each row's only candidate is its positive -> -log(1) = 0, whatever the vectors.
    assert nt_xent_loss(torch.tensor([[1.0, 2.0]]), torch.tensor([[-3.0, 0.5]]), 0.5).item() == pytest.approx(0.0,
                                                                                                               abs=1e-6)
    # N = 2, orthonormal pairs seen twice: each row has positive cos 1 and two negatives cos 0,
    # so every row gives -1/t + log(e^{1/t} + 2) = log(1 + 2 e^{-1/t}).
    e = torch.eye(2, dtype=torch.float64)
    for t in (0.2, 0.5, 1.0):
        assert nt_xent_loss(e, e.clone(), t).item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / t)), rel=1e-12)
    # Scale invariance: cosine similarity ignores the norms.
    z1, z2 = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    assert nt_xent_loss(3 * z1, 0.1 * z2, 0.5).item() == pytest.approx(nt_xent_loss(z1, z2, 0.5).item(), rel=1e-12)


def test_nt_xent_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    z1 = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nt_xent_loss(a, b, 0.3), (z1, z2))


def test_nt_xent_is_fp32_for_bf16_input_under_autocast():
    z1, z2 = torch.randn(6, 8), torch.randn(6, 8)
    a, b = z1.bfloat16(), z2.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = nt_xent_loss(a, b, 0.5)
    assert got.dtype == torch.float32
    # Same number as the fp32 computation on the same (bf16-rounded) inputs.
    assert got.item() == pytest.approx(nt_xent_loss(a.float(), b.float(), 0.5).item(), rel=1e-6)


def test_nt_xent_rejects_mismatched_sides():
    with pytest.raises(ValueError, match="same shape"):
        nt_xent_loss(torch.randn(4, 3), torch.randn(5, 3), 0.5)


def test_byol_loss_known_values():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert byol_loss(a, 3 * a).item() == pytest.approx(0.0, abs=1e-6)  # identical directions
    assert byol_loss(a, a.flip(1)).item() == pytest.approx(2.0, abs=1e-6)  # orthogonal
    assert byol_loss(a, -a).item() == pytest.approx(4.0, abs=1e-6)  # opposite
    assert byol_loss(a, torch.tensor([[1.0, 0.0], [0.0, -1.0]])).item() == pytest.approx(2.0, abs=1e-6)  # (0+4)/2


def test_byol_loss_gradcheck_and_no_gradient_into_z():
    g = torch.Generator().manual_seed(2)
    p = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q: byol_loss(q, z), (p,))
    byol_loss(p, z).backward()
    assert p.grad is not None and z.grad is None  # z is the target branch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert byol_loss(p.detach().bfloat16(), z.detach().bfloat16()).dtype == torch.float32


# --- methods on the tiny CPU backbone -------------------------------------------------------------

B = 8


def _views(seed: int = 0, step: int = 0, total: int = 2) -> Views:
    g = torch.Generator().manual_seed(seed)
    return Views(views=[torch.randn(B, 3, 28, 28, generator=g), torch.randn(B, 3, 28, 28, generator=g)],
                 step=step, total_steps=total)


def _simclr() -> SimCLR:
    torch.manual_seed(0)
    return SimCLR(create_backbone("resnet18_narrow"), temperature=0.5, proj_hidden=32, proj_dim=16)


def _byol(base_momentum: float = 0.996) -> BYOL:
    torch.manual_seed(0)
    return BYOL(create_backbone("resnet18_narrow"), base_momentum=base_momentum, proj_hidden=32, proj_dim=16,
                pred_hidden=32)


def _train_two_steps(method: SSLMethod) -> list[dict]:
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    method.train()
    all_logs = []
    for step in range(2):
        loss, logs = method(_views(seed=step, step=step, total=2))
        assert loss.dim() == 0 and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        method.after_optimizer_step(step, 2)
        all_logs.append(logs)
    return all_logs


@pytest.mark.parametrize("make", [_simclr, _byol], ids=["simclr", "byol"])
def test_method_trains_two_steps_with_finite_loss(make):
    method = make()
    logs = _train_two_steps(method)
    key = "loss_simclr" if isinstance(method, SimCLR) else "loss_byol"
    assert all(key in entry and "loss" in entry for entry in logs)
    assert method.feature_dim == 256


@pytest.mark.parametrize("make", [_simclr, _byol], ids=["simclr", "byol"])
def test_views_go_through_one_backbone_call(make):
    method = make()
    calls = []
    method.backbone.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    batch = _views()
    method(batch)
    assert calls == [2 * B]


def test_simclr_projector_layout():
    m = SimCLR(create_backbone("resnet18_narrow"))  # defaults: 256 -> 2048 -> 2048 -> 128
    linears = [x for x in m.projector if isinstance(x, nn.Linear)]
    assert [(x.in_features, x.out_features) for x in linears] == [(256, 2048), (2048, 2048), (2048, 128)]
    assert all(x.bias is None for x in linears)
    last = m.projector[-1]
    assert isinstance(last, nn.BatchNorm1d) and not last.affine and last.num_features == 128


def test_simclr_loss_is_nt_xent_of_its_projections():
    m = _simclr().train()
    batch = _views()
    loss, _ = m(batch)
    torch.manual_seed(0)
    with torch.no_grad():
        z = m.projector(m.backbone(torch.cat(batch.views)))  # BN in train mode: same batch statistics
    assert loss.item() == pytest.approx(nt_xent_loss(z[:B], z[B:], 0.5).item(), rel=1e-5)


def test_byol_target_gets_no_gradient_and_moves_toward_online():
    m = _byol(base_momentum=0.9)
    target = list(m.target_backbone.parameters()) + list(m.target_projector.parameters())
    online = list(m.backbone.parameters()) + list(m.projector.parameters())
    assert all(not p.requires_grad for p in target)
    loss, _ = m(_views())
    loss.backward()
    assert all(p.grad is None for p in target)
    assert all(p.grad is not None for p in m.predictor.parameters())
    with torch.no_grad():  # stands in for an optimiser step
        for p in online:
            p.add_(torch.randn_like(p) * 0.01)
    before = [t.detach().clone() for t in target]
    dist_before = sum((t - o).pow(2).sum() for t, o in zip(before, online))
    m.after_optimizer_step(0, 10)
    mom = m.momentum_at(1, 10)
    dist_after = sum((t - o).pow(2).sum() for t, o in zip(target, online))
    assert dist_after < dist_before
    for t, t0, o in zip(target, before, online):  # exactly the EMA formula
        torch.testing.assert_close(t, mom * t0 + (1 - mom) * o)
    # BN running statistics are copied from the online net.
    torch.testing.assert_close(m.target_backbone.bn1.running_mean, m.backbone.bn1.running_mean)


def test_byol_momentum_schedule_goes_from_base_to_one():
    m = _byol()
    assert m.momentum_at(0, 100) == pytest.approx(0.996)
    assert m.momentum_at(50, 100) == pytest.approx(0.998)
    assert m.momentum_at(100, 100) == pytest.approx(1.0)
    # The update after the last optimiser step (0-based step total-1) uses momentum 1: a no-op.
    with torch.no_grad():
        for p in m.backbone.parameters():
            p.add_(1.0)
    before = [t.clone() for t in m.target_backbone.parameters()]
    m.after_optimizer_step(99, 100)
    for t, t0 in zip(m.target_backbone.parameters(), before):
        torch.testing.assert_close(t, t0)


def test_byol_target_is_in_state_dict_for_resume():
    keys = _byol().state_dict().keys()
    assert any(k.startswith("target_backbone.") for k in keys)
    assert any(k.startswith("target_projector.") for k in keys)


def test_registry_and_config_errors():
    assert get_method_class("simclr") is SimCLR and get_method_class("byol") is BYOL
    with pytest.raises(ValueError, match="simclr"):
        SimCLR.from_config(create_backbone("resnet18_narrow"), {"name": "simclr", "temprature": 0.5})
    with pytest.raises(ValueError, match="2 views"):
        _simclr()(Views(views=[torch.randn(B, 3, 28, 28)] * 3))

"""EquiMod on SimCLR and BYOL: one backbone call on [x0; v1; v2], heads, loss, parameter handling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.methods import get_method_class
from training.methods.byol import BYOL
from training.methods.equimod import EquiModBYOL, EquiModSimCLR, standardize_params
from training.methods.simclr import SimCLR, nt_xent_loss
from training.views import Views
from zoo.backbones import create_backbone

B, P = 8, 15
TINY_SIMCLR = dict(proj_hidden=32, proj_dim=16, eq_hidden=32, eq_dim=16, param_dim=P)
TINY_BYOL = dict(proj_hidden=32, proj_dim=16, pred_hidden=32, eq_hidden=32, eq_dim=16, param_dim=P)


pytestmark = pytest.mark.usefixtures("one_thread")


def _views(seed: int = 0, p_dim: int = P, step: int = 0, total: int = 2) -> Views:
    g = torch.Generator().manual_seed(seed)

    def img() -> torch.Tensor:
        return torch.randn(B, 3, 28, 28, generator=g)

    return Views(views=[img(), img()], original=img(),
                 params=[torch.rand(B, p_dim, generator=g) * 20, torch.rand(B, p_dim, generator=g) * 20],
                 step=step, total_steps=total)


def _make(cls, **kw):
    torch.manual_seed(0)
    tiny = TINY_SIMCLR if cls is EquiModSimCLR else TINY_BYOL
    return cls(create_backbone("resnet18_narrow"), **{**tiny, **kw})


CLASSES = pytest.mark.parametrize("cls", [EquiModSimCLR, EquiModBYOL], ids=["simclr", "byol"])


@CLASSES
def test_x0_and_views_go_through_one_backbone_call_in_order(cls):
    m = _make(cls)
    seen = []
    m.backbone.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    batch = _views()
    m(batch)
    assert len(seen) == 1  # BN statistics over x0 and both views together
    x = seen[0]
    assert x.shape[0] == 3 * B
    assert torch.equal(x[:B], batch.original)
    assert torch.equal(x[B:2 * B], batch.views[0]) and torch.equal(x[2 * B:], batch.views[1])


@CLASSES
def test_declares_what_the_data_path_must_deliver(cls):
    assert cls.needs_params and cls.needs_original
    assert get_method_class(cls.name) is cls
    assert issubclass(cls, (SimCLR, BYOL))


def test_heads_have_the_spec_layout():
    m = EquiModSimCLR(create_backbone("resnet18_narrow"))  # defaults = the authors' sizes
    eq = m.equivariance
    g = [x for x in eq.eq_projector if isinstance(x, nn.Linear)]
    assert [(x.in_features, x.out_features) for x in g] == [(256, 2048), (2048, 2048), (2048, 128)]
    assert all(x.bias is None for x in g)
    assert isinstance(eq.eq_projector[-1], nn.BatchNorm1d) and not eq.eq_projector[-1].affine
    pi_lin, pi_bn = eq.param_projector
    assert (pi_lin.in_features, pi_lin.out_features, pi_lin.bias) == (15, 128, None)
    assert isinstance(pi_bn, nn.BatchNorm1d) and pi_bn.affine and pi_bn.num_features == 128
    u_lin, u_bn = eq.eq_predictor
    assert (u_lin.in_features, u_lin.out_features, u_lin.bias) == (256, 128, None)
    assert isinstance(u_bn, nn.BatchNorm1d) and not u_bn.affine
    mb = EquiModBYOL(create_backbone("resnet18_narrow"), proj_hidden=32, pred_hidden=32)
    assert mb.equivariance.param_projector[0].in_features == 18  # BYOL layout: + blur + solarize
    assert mb.lmbd == 1.0 and mb.t_y == 0.2 and m.temperature == 0.5


@CLASSES
def test_head_outputs_and_loss_composition(cls):
    m = _make(cls, lmbd=0.7).train()
    batch = _views()
    h = m.backbone(torch.cat([batch.original, *batch.views]))
    y_t, y_hat = m.equivariance(h, torch.cat(batch.params))
    assert y_t.shape == y_hat.shape == (2 * B, 16)
    loss, logs = m(batch)
    base = logs["loss_simclr"] if cls is EquiModSimCLR else logs["loss_byol"]
    assert loss.item() == pytest.approx((base + 0.7 * logs["loss_equiv"]).item(), rel=1e-6)
    # The equivariance term is NT-Xent(tau_y) with positives y_t[i] <-> y_hat[i] (same batch -> same BN stats).
    assert logs["loss_equiv"].item() == pytest.approx(nt_xent_loss(y_t, y_hat, 0.2).item(), rel=1e-5)


@CLASSES
def test_loss_finite_and_gradient_reaches_x0_path(cls):
    m = _make(cls).train()
    batch = _views()
    batch.original.requires_grad_(True)
    loss, _ = m(batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert batch.original.grad is not None and batch.original.grad.abs().sum() > 0  # no stop-grad on y0
    for head in (m.equivariance.eq_projector, m.equivariance.param_projector, m.equivariance.eq_predictor):
        assert all(p.grad is not None for p in head.parameters())


@CLASSES
def test_trains_two_steps_with_finite_loss(cls):
    m = _make(cls).train()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    for step in range(2):
        loss, logs = m(_views(seed=step, step=step))
        assert torch.isfinite(loss) and torch.isfinite(logs["loss_equiv"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        m.after_optimizer_step(step, 2)


def test_standardize_params_is_column_wise_and_pure():
    p = torch.tensor([[1.0, 10.0, 0.0], [3.0, 30.0, 1.0]])
    before = p.clone()
    out = standardize_params(p, [2.0, 20.0, 0.5], [1.0, 10.0, 0.5])
    torch.testing.assert_close(out, torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]]))
    assert torch.equal(p, before)
    assert standardize_params(torch.tensor([[2, 4]]), [0, 0], [2, 2]).dtype == torch.float32
    with pytest.raises(ValueError, match="columns"):
        standardize_params(p, [0.0, 0.0], [1.0, 1.0])


def test_method_feeds_standardized_params_to_the_param_projector():
    mean = [float(i) for i in range(P)]
    std = [0.5 + i for i in range(P)]
    m = _make(EquiModSimCLR, param_mean=mean, param_std=std)
    seen = []
    m.equivariance.param_projector.register_forward_hook(lambda mod, inp, out: seen.append(inp[0]))
    batch = _views()
    m(batch)
    expected = (torch.cat(batch.params) - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(seen[0], expected)
    assert "equivariance.param_mean" not in m.state_dict()  # recipe constants, not checkpoint state


@CLASSES
def test_params_of_wrong_dim_give_a_clear_error(cls):
    m = _make(cls)
    with pytest.raises(ValueError, match=r"Views.params\[0\] has shape \(8, 17\), expected \[8, 15\].*param_dim"):
        m(_views(p_dim=17))
    with pytest.raises(ValueError, match="param_mean must be a list of param_dim=15"):
        _make(cls, param_mean=[0.0] * 17)
    with pytest.raises(ValueError, match="param_std must be > 0"):
        _make(cls, param_std=[1.0] * 14 + [0.0])


@CLASSES
def test_missing_inputs_give_a_clear_error(cls):
    m = _make(cls)
    batch = _views()
    with pytest.raises(ValueError, match="Views.params"):
        m(Views(views=batch.views, original=batch.original))
    with pytest.raises(ValueError, match="Views.original"):
        m(Views(views=batch.views, params=batch.params))
    with pytest.raises(ValueError, match="same call"):
        m(Views(views=batch.views, params=batch.params, original=batch.original[:, :, :14, :14]))


def test_byol_variant_keeps_ema_target_on_backbone_and_projector_only():
    m = _make(EquiModBYOL)
    assert not any(k.startswith("target_") and "equivariance" in k for k in m.state_dict())
    loss, logs = m(_views())
    loss.backward()
    assert all(p.grad is None for p in m.target_backbone.parameters())
    assert "momentum" in logs


def test_float64_or_integer_params_are_accepted():
    m = _make(EquiModSimCLR)
    batch = _views()
    batch.params = [batch.params[0].double(), batch.params[1].round().long()]
    loss, _ = m(batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)

"""W-MSE: whitening, the loss (values, gradients, invariances, errors) and the method's training step."""

import os

import numpy as np
import pytest
import torch

from training.methods.wmse import WMSE, WhiteningError, whiten, wmse_loss
from training.views import Views
from zoo.backbones import create_backbone


def _unbiased_cov(z: torch.Tensor) -> torch.Tensor:
    zc = z - z.mean(0)
    return zc.T @ zc / (z.shape[0] - 1)


def _well_conditioned(n: int, d: int, dtype=torch.float64) -> torch.Tensor:
    mix = torch.eye(d, dtype=dtype) + 0.3 * torch.randn(d, d, dtype=dtype)
    return torch.randn(n, d, dtype=dtype) @ mix + 2.0


# ------------------------------------------------------------------ whiten
def test_whiten_output_has_identity_unbiased_covariance_and_zero_mean():
    x = _well_conditioned(64, 8)
    z = whiten(x)
    assert z.dtype == torch.float64
    torch.testing.assert_close(_unbiased_cov(z), torch.eye(8, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(z.mean(0), torch.zeros(8, dtype=torch.float64), atol=1e-10, rtol=0)


def test_whiten_with_eps_shrinks_the_covariance_towards_identity():
    x = _well_conditioned(32, 4)
    eps = 0.3
    z = whiten(x, eps=eps)
    xc = x - x.mean(0)
    shrunk = (1 - eps) * _unbiased_cov(x) + eps * torch.eye(4, dtype=x.dtype)
    # z = xc W^T with W shrunk W^T = I, so W^{-1} W^{-T} = shrunk: z^T z/(n-1) = W cov W^T
    w = torch.linalg.lstsq(xc, z).solution.T
    torch.testing.assert_close(w @ shrunk @ w.T, torch.eye(4, dtype=x.dtype), atol=1e-9, rtol=0)


def test_batched_whiten_equals_a_loop_over_sub_batches():
    x = torch.stack([_well_conditioned(16, 4) for _ in range(5)])
    batched = whiten(x)
    looped = torch.stack([whiten(x[s]) for s in range(5)])
    torch.testing.assert_close(batched, looped, atol=1e-12, rtol=0)


def test_whiten_is_fp32_for_bf16_input_under_bf16_autocast():
    x = _well_conditioned(64, 8, torch.float32).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = whiten(x)
    assert z.dtype == torch.float32
    # Whitening of the (bf16-rounded) values in fp32: covariance identity to fp32 accuracy.
    torch.testing.assert_close(_unbiased_cov(z), torch.eye(8), atol=1e-4, rtol=0)


def test_whiten_is_unchanged_by_an_upper_triangular_linear_map_and_a_shift():
    # Cholesky whitening: x A + b with A upper triangular (positive diagonal) gives the same output.
    x = _well_conditioned(32, 4)
    a = torch.triu(torch.rand(4, 4, dtype=torch.float64)) + torch.eye(4, dtype=torch.float64)
    torch.testing.assert_close(whiten(x @ a + 5.0), whiten(x), atol=1e-10, rtol=0)


# ------------------------------------------------------------------ wmse_loss: values
def _views(n=32, emb=4, d=2, noise=0.5, dtype=torch.float64) -> list[torch.Tensor]:
    base = _well_conditioned(n, emb, dtype)
    return [base + noise * torch.randn(n, emb, dtype=dtype) for _ in range(d)]


def test_wmse_loss_is_zero_for_identical_views():
    v = _well_conditioned(32, 4)
    loss = wmse_loss([v, v.clone(), v.clone()], w_size=16, w_iter=2, generator=torch.Generator().manual_seed(0))
    assert abs(loss.item()) < 1e-12


def _numpy_wmse(views: list[np.ndarray], perms: np.ndarray, w_size: int) -> float:
    """Float64 re-implementation written differently: Cholesky whitening of a centred sub-batch X
    is sqrt(n-1) Q from the thin QR X = QR with R's diagonal made positive; pairs and sub-batches
    looped explicitly, cosines with explicit norms."""
    d, terms = len(views), []
    for perm in perms:
        for a in range(d):
            for b in range(a + 1, d):
                cos_sum = 0.0
                for start in range(0, len(perm), w_size):
                    rows = perm[start:start + w_size]
                    zs = []
                    for v in (views[a], views[b]):
                        xc = v[rows] - v[rows].mean(axis=0)
                        q, r = np.linalg.qr(xc)
                        zs.append(np.sqrt(len(rows) - 1) * q * np.sign(np.diag(r)))
                    for za, zb in zip(*zs):
                        cos_sum += za @ zb / (np.linalg.norm(za) * np.linalg.norm(zb))
                terms.append(2.0 - 2.0 * cos_sum / len(perm))
    return float(np.mean(terms))


def test_wmse_loss_matches_a_numpy_float64_qr_reimplementation():
    views = _views(n=24, emb=3, d=3)
    perms = torch.stack([torch.randperm(24) for _ in range(2)])
    loss = wmse_loss(views, w_size=8, w_iter=2, perms=perms)
    expected = _numpy_wmse([v.numpy() for v in views], perms.numpy(), 8)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - expected) < 1e-10
    assert 0.0 < expected < 4.0


def test_wmse_loss_gradcheck_float64():
    views = [v.requires_grad_() for v in _views(n=8, emb=2, d=2)]
    perms = torch.stack([torch.randperm(8), torch.randperm(8)])
    assert torch.autograd.gradcheck(lambda a, b: wmse_loss([a, b], w_size=4, w_iter=2, perms=perms), views)


def test_wmse_loss_sends_gradient_to_every_view():
    views = [v.requires_grad_() for v in _views(n=16, emb=2, d=3)]
    wmse_loss(views, w_size=8, generator=torch.Generator().manual_seed(1)).backward()
    for v in views:  # no stop-gradient on any view (solo-learn detaches the second one)
        assert v.grad is not None and v.grad.abs().sum() > 0


def test_wmse_loss_is_invariant_to_a_shared_upper_triangular_affine_map():
    views = _views(n=32, emb=4, d=3)
    a = torch.triu(torch.randn(4, 4, dtype=torch.float64)) + 3.0 * torch.diag(torch.tensor([1.0, -1.0, 1.0, -1.0],
                                                                                            dtype=torch.float64))
    b = torch.randn(4, dtype=torch.float64)
    perms = torch.stack([torch.randperm(32)])
    before = wmse_loss(views, w_size=8, perms=perms)
    after = wmse_loss([v @ a + b for v in views], w_size=8, perms=perms)
    torch.testing.assert_close(after, before, atol=1e-10, rtol=0)


def test_wmse_loss_is_not_invariant_to_a_general_rotation_because_whitening_is_cholesky():
    # Pins the choice of Cholesky (not ZCA) whitening: each sub-batch's output is rotated differently.
    views = _views(n=32, emb=4, d=2)
    rot, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    perms = torch.stack([torch.randperm(32)])
    before = wmse_loss(views, w_size=8, perms=perms)
    after = wmse_loss([v @ rot for v in views], w_size=8, perms=perms)
    assert abs((after - before).item()) > 1e-4


def test_wmse_loss_perms_and_generator_paths_agree():
    views = _views(n=32, emb=4, d=2)
    gen = torch.Generator().manual_seed(123)
    from_gen = wmse_loss(views, w_size=8, w_iter=3, generator=gen)
    ref = torch.Generator().manual_seed(123)
    perms = torch.stack([torch.randperm(32, generator=ref) for _ in range(3)])
    torch.testing.assert_close(wmse_loss(views, w_size=8, w_iter=3, perms=perms), from_gen, atol=0, rtol=0)


def test_wmse_loss_depends_on_the_partition():
    views = _views(n=32, emb=4, d=2)
    one = wmse_loss(views, w_size=8, generator=torch.Generator().manual_seed(1))
    other = wmse_loss(views, w_size=8, generator=torch.Generator().manual_seed(2))
    assert abs((one - other).item()) > 1e-6


def test_wmse_loss_is_fp32_for_bf16_inputs_under_autocast():
    views = [v.to(torch.bfloat16) for v in _views(n=32, emb=4, dtype=torch.float32)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = wmse_loss(views, w_size=16, generator=torch.Generator().manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


# ------------------------------------------------------------------ wmse_loss: errors
def test_wmse_loss_rejects_w_size_below_twice_emb():
    with pytest.raises(ValueError, match="raise w_size or lower emb"):
        wmse_loss(_views(n=32, emb=8), w_size=8)


def test_wmse_loss_refuses_to_draw_from_the_global_rng():
    with pytest.raises(ValueError, match="generator=torch.Generator"):
        wmse_loss(_views(n=32, emb=4), w_size=16)


def test_wmse_loss_rejects_a_batch_not_divisible_by_w_size():
    with pytest.raises(ValueError, match="not a multiple of w_size=8"):
        wmse_loss(_views(n=20, emb=4), w_size=8)


def test_wmse_loss_rejects_perms_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"perms must be \[w_iter, N\]"):
        wmse_loss(_views(n=16, emb=2), w_size=8, w_iter=2, perms=torch.randperm(16)[None])


def test_collapsed_embeddings_raise_the_whitening_error_not_nan():
    collapsed = torch.ones(16, 4).mul(0.7)
    with pytest.raises(WhiteningError, match="collapsed.*raise w_size.*w_eps > 0.*lower the lr"):
        wmse_loss([collapsed, collapsed.clone()], w_size=8, generator=torch.Generator().manual_seed(0))
    assert issubclass(WhiteningError, FloatingPointError)


def test_nan_embeddings_raise_the_whitening_error():
    v = torch.randn(16, 2)
    v[3, 1] = float("nan")
    with pytest.raises(WhiteningError):
        wmse_loss([v, torch.randn(16, 2)], w_size=8, generator=torch.Generator().manual_seed(0))


def test_w_eps_makes_collapsed_embeddings_whitenable():
    collapsed = torch.ones(16, 4)
    loss = wmse_loss([collapsed, collapsed.clone()], w_size=8, eps=1e-4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)


# ------------------------------------------------------------------ the method
class _TinyBackbone(torch.nn.Module):
    """A linear stand-in for the ResNet where only the head/loss plumbing is tested (keeps CPU time low)."""

    def __init__(self, feature_dim: int = 32):
        super().__init__()
        self.feature_dim = feature_dim
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 28 * 28, feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _batch(b=16, d=2, step=0) -> Views:
    return Views(views=[torch.randn(b, 3, 28, 28) for _ in range(d)], generator=torch.Generator().manual_seed(step),
                 step=step, total_steps=2)


def test_wmse_method_trains_two_steps_with_one_backbone_call_per_step():
    method = WMSE(create_backbone("resnet18_narrow"), emb=8, hidden=32, w_size=16)
    calls = []
    method.backbone.register_forward_hook(lambda *_: calls.append(1))
    opt = torch.optim.SGD(method.parameters(), lr=0.01)
    method.train()
    for step in range(2):
        loss, logs = method(_batch(step=step))
        assert torch.isfinite(loss) and loss.shape == () and set(logs) == {"loss"}
        opt.zero_grad()
        loss.backward()
        assert method.projector[0].weight.grad.abs().sum() > 0
        assert method.backbone.conv1.weight.grad.abs().sum() > 0
        opt.step()
        method.after_optimizer_step(step, 2)
    assert len(calls) == 2
    assert method.projector[0].in_features == 256 and method.projector[-1].out_features == 8


def test_wmse_method_handles_four_views_and_bf16_autocast():
    method = WMSE(_TinyBackbone(), emb=4, hidden=16, w_size=8).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = method(_batch(b=8, d=4))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_wmse_method_rejects_w_size_below_twice_emb_at_construction():
    with pytest.raises(ValueError, match="raise w_size or lower emb"):
        WMSE(_TinyBackbone(), emb=64, w_size=64)


def test_wmse_method_default_head_follows_the_cifar_recipe():
    method = WMSE(_TinyBackbone(256))
    linears = [m for m in method.projector if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(256, 1024), (1024, 64)]
    assert all(m.bias is not None for m in linears)
    assert isinstance(method.projector[1], torch.nn.BatchNorm1d)
    assert (method.w_size, method.w_iter, method.w_eps) == (128, 1, 0.0)


# ------------------------------------------------------------------ two processes
def _two_rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # same weights and data on both ranks
        # eval: the projector's BN uses running statistics, so each row's embedding is rank-independent
        method = WMSE(_TinyBackbone(), emb=4, hidden=16, w_size=8).double().eval()
        full = _batch(b=16, d=3)
        local = Views(views=[v[8 * rank: 8 * rank + 8].double() for v in full.views],
                      generator=torch.Generator().manual_seed(7))
        loss, _ = method(local)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in method.parameters()])
        dist.all_reduce(grads)
        grads /= 2  # what DDP's gradient averaging does
        torch.save({"loss": loss.detach(), "grads": grads}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_two_ranks(worker, *args, timeout_s: float = 60.0) -> None:
    """Fork two gloo ranks (fork: no re-import of torch; spawn costs ~10 s on two shared cores)."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=args, nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"two-rank worker did not finish in {timeout_s} s")


@pytest.mark.slow
@pytest.mark.skipif(not (hasattr(os, "fork") and torch.distributed.is_available()
                         and torch.distributed.is_gloo_available()), reason="needs fork and the gloo backend")
def test_two_processes_whiten_the_global_batch_and_match_the_single_process_gradient(tmp_path):
    _run_two_ranks(_two_rank_worker, str(tmp_path / "init"), str(tmp_path))
    torch.manual_seed(0)
    method = WMSE(_TinyBackbone(), emb=4, hidden=16, w_size=8).double().eval()
    full = _batch(b=16, d=3)
    full = Views(views=[v.double() for v in full.views], generator=torch.Generator().manual_seed(7))
    loss, _ = method(full)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in method.parameters()])
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt")
        # Same loss, and DDP-averaged gradients equal the single-process ones: no x world_size factor.
        torch.testing.assert_close(out["loss"], loss.detach(), atol=1e-12, rtol=0)
        torch.testing.assert_close(out["grads"], grads, atol=1e-10, rtol=1e-8)

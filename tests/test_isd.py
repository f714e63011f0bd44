"""ISD: the distillation loss (values, gradients, dtypes) and the method's teacher, queue and state."""

import os
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import training.methods.isd as isd_module
from training.methods.isd import ISD, isd_loss
from training.views import Views
from zoo.backbones import create_backbone


def _queue(k: int, d: int, dtype=torch.float64) -> torch.Tensor:
    return F.normalize(torch.randn(k, d, dtype=dtype), dim=1)


# ------------------------------------------------------------------ isd_loss
def test_isd_loss_is_zero_when_student_equals_teacher_at_equal_temperatures():
    q = torch.randn(6, 8, dtype=torch.float64)
    loss = isd_loss(q, q.clone() * 3.0, _queue(20, 8), t_student=0.1, t_teacher=0.1)  # scale: normalised away
    assert abs(loss.item()) < 1e-12


def test_isd_loss_is_positive_for_different_student_and_teacher():
    queue = _queue(20, 8)
    q, k = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    assert isd_loss(q, k, queue, 0.1, 0.1).item() > 1e-3
    # Same embeddings, sharper teacher than student: the distributions differ, so the KL does too.
    assert isd_loss(q, q, queue, t_student=0.2, t_teacher=0.05).item() > 1e-3


def test_isd_loss_matches_a_hand_written_float64_kl():
    queue = _queue(30, 5)
    q, k = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    t_s, t_t = 0.1, 0.04
    qn, kn, a = q.numpy(), k.numpy(), queue.numpy()
    qn = qn / np.linalg.norm(qn, axis=1, keepdims=True)
    kn = kn / np.linalg.norm(kn, axis=1, keepdims=True)

    def softmax(x):
        e = np.exp(x - x.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    p_t, p_s = softmax(kn @ a.T / t_t), softmax(qn @ a.T / t_s)
    expected = np.sum(p_t * (np.log(p_t) - np.log(p_s))) / q.shape[0]
    assert abs(isd_loss(q, k, queue, t_s, t_t).item() - expected) < 1e-12


def test_isd_loss_gradcheck_float64():
    q = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(3, 4, dtype=torch.float64)
    queue = _queue(10, 4)
    assert torch.autograd.gradcheck(lambda x: isd_loss(x, k, queue, 0.2, 0.1), (q,))


def test_isd_loss_sends_no_gradient_to_the_teacher_side():
    q = torch.randn(3, 4, requires_grad=True)
    k = torch.randn(3, 4, requires_grad=True)
    isd_loss(q, k, _queue(10, 4, torch.float32), 0.1, 0.1).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None


def test_isd_loss_is_fp32_for_bf16_inputs_under_autocast():
    q, k = torch.randn(4, 8).to(torch.bfloat16), torch.randn(4, 8).to(torch.bfloat16)
    queue = _queue(64, 8, torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = isd_loss(q, k, queue, 0.02, 0.02)
    assert loss.dtype == torch.float32
    expected = isd_loss(q.double(), k.double(), queue.double(), 0.02, 0.02)
    assert abs(loss.item() - expected.item()) < 1e-4 * max(1.0, expected.item())


def test_isd_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="queue"):
        isd_loss(torch.randn(2, 4), torch.randn(2, 4), torch.randn(10, 5), 0.1, 0.1)


# ------------------------------------------------------------------ the method
class _TinyBackbone(torch.nn.Module):
    """A linear stand-in for the ResNet where only heads, teacher and queue plumbing are tested (CPU time)."""

    def __init__(self, feature_dim: int = 8, size: int = 28):
        super().__init__()
        self.feature_dim = feature_dim
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * size * size, feature_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _method(backbone: torch.nn.Module | None = None, **kw) -> ISD:
    hp = dict(queue_size=64, predictor_hidden=32)
    hp.update(kw)
    return ISD(backbone if backbone is not None else _TinyBackbone(), **hp).train()


def _batch(b=16, step=0) -> Views:
    return Views(views=[torch.randn(b, 3, 28, 28), torch.randn(b, 3, 28, 28)],
                 generator=torch.Generator().manual_seed(step), step=step, total_steps=2)


@pytest.fixture
def recorded(monkeypatch):
    """Records the (q, k, queue) that the method hands to isd_loss."""
    calls = []

    def spy(q, k, queue, t_student, t_teacher):
        calls.append((q.detach().clone(), k.detach().clone(), queue.detach().clone()))
        return isd_loss(q, k, queue, t_student, t_teacher)

    monkeypatch.setattr(isd_module, "isd_loss", spy)
    return calls


def test_isd_trains_two_steps_and_fills_the_queue_fifo_after_the_similarities(recorded):
    method = _method(create_backbone("resnet18_narrow"), queue_size=32)
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.01)
    for step in range(2):
        before, ptr = method.queue.clone(), int(method.queue_ptr)
        loss, logs = method(_batch(step=step))
        assert torch.isfinite(loss) and set(logs) == {"loss"}
        _, k, used = recorded[-1]
        keys = F.normalize(k, dim=1)
        # The step's own keys were not in the queue its similarities used ...
        assert torch.equal(used, before)
        assert (keys @ used.T).max() < 0.999
        # ... and are written afterwards at the pointer (FIFO), the other rows untouched.
        assert ptr == 16 * step
        torch.testing.assert_close(method.queue[ptr:ptr + 16], keys, atol=1e-6, rtol=0)
        rest = torch.ones(32, dtype=torch.bool)
        rest[ptr:ptr + 16] = False
        assert torch.equal(method.queue[rest], before[rest])
        assert int(method.queue_ptr) == (ptr + 16) % 32
        opt.zero_grad()
        loss.backward()
        for p in list(method.teacher_backbone.parameters()) + list(method.teacher_projector.parameters()):
            assert p.grad is None and not p.requires_grad  # teacher never gets gradient
        assert method.predictor[0].weight.grad.abs().sum() > 0
        assert method.backbone.conv1.weight.grad.abs().sum() > 0
        opt.step()
        method.after_optimizer_step(step, 2)
    assert int(method.queue_ptr) == 0  # wrapped around: 2 x 16 = 32
    torch.testing.assert_close(method.queue.norm(dim=1), torch.ones(32), atol=1e-5, rtol=0)


def test_teacher_is_updated_at_the_start_of_forward_with_the_previous_student_weights():
    method = _method(momentum=0.5)
    with torch.no_grad():  # make student and teacher differ, as after some optimiser steps
        for p in method.backbone.parameters():
            p.add_(0.1)
    student = [p.detach().clone() for p in method.backbone.parameters()]
    teacher = [p.detach().clone() for p in method.teacher_backbone.parameters()]
    method(_batch())  # no optimiser step: the update must already be there after forward
    for t_new, t_old, s in zip(method.teacher_backbone.parameters(), teacher, student):
        torch.testing.assert_close(t_new, 0.5 * t_old + 0.5 * s)
    after_forward = [p.detach().clone() for p in method.teacher_backbone.parameters()]
    method.after_optimizer_step(0, 2)  # does nothing: ISD's EMA lives in forward
    assert all(torch.equal(a, b) for a, b in zip(method.teacher_backbone.parameters(), after_forward))


def test_teacher_runs_in_train_mode_with_the_method():
    method = _method()
    assert method.teacher_backbone.training
    method.eval()
    assert not method.teacher_backbone.training


def test_eval_mode_forward_changes_neither_teacher_nor_queue():
    method = _method(momentum=0.5)
    state = {k: v.clone() for k, v in method.state_dict().items()}
    method.eval()
    with torch.no_grad():
        loss, _ = method(_batch())
    assert torch.isfinite(loss)
    assert all(torch.equal(v, state[k]) for k, v in method.state_dict().items())


def test_state_dict_holds_queue_pointer_and_teacher_and_restores_them():
    method = _method(projector=True, proj_hidden=32, proj_dim=16)
    method(_batch())
    sd = method.state_dict()
    assert sd["queue"].shape == (64, 16) and int(sd["queue_ptr"]) == 16
    assert any(k.startswith("teacher_backbone.") for k in sd)
    assert any(k.startswith("teacher_projector.") for k in sd)
    fresh = _method(projector=True, proj_hidden=32, proj_dim=16)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.queue, method.queue) and int(fresh.queue_ptr) == 16


def test_queue_rows_are_l2_normalised_at_initialisation():
    # train_isd.py normalises columns (dim=0); rows are what the similarities need.
    method = _method(queue_size=128)
    torch.testing.assert_close(method.queue.norm(dim=1), torch.ones(128), atol=1e-5, rtol=0)


def test_queue_size_must_be_a_multiple_of_the_global_batch():
    method = _method(queue_size=40)
    with pytest.raises(ValueError, match="queue_size=40 is not a multiple of the global batch 16.*queue_size=32 or 48"):
        method(_batch())


def test_method_rejects_other_than_two_views():
    with pytest.raises(ValueError, match="exactly 2 views"):
        _method()(Views(views=[torch.randn(16, 3, 28, 28)] * 3))


def test_resnet18_recipe_heads_have_the_authors_shapes():
    method = ISD(_TinyBackbone(512))  # defaults = train_isd.py on a 512-d ResNet-18
    pred = method.predictor
    assert [type(m).__name__ for m in pred] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert (pred[0].in_features, pred[0].out_features, pred[0].bias) == (512, 512, None)
    assert (pred[3].in_features, pred[3].out_features) == (512, 512) and pred[3].bias is not None
    assert isinstance(method.projector, torch.nn.Identity) and isinstance(method.teacher_projector, torch.nn.Identity)
    assert method.queue.shape == (128000, 512)
    assert (method.t_student, method.t_teacher, method.momentum) == (0.02, 0.02, 0.999)


def test_projector_recipe_heads_have_the_authors_shapes():
    method = _method(projector=True, proj_hidden=64, proj_dim=16, predictor_hidden=64, t_teacher=0.01, t_student=0.1,
                     momentum=0.99)
    proj = [(m.in_features, m.out_features, m.bias is not None) for m in method.projector
            if isinstance(m, torch.nn.Linear)]
    pred = [(m.in_features, m.out_features, m.bias is not None) for m in method.predictor
            if isinstance(m, torch.nn.Linear)]
    assert proj == [(8, 64, True), (64, 16, True)]
    assert pred == [(16, 64, True), (64, 16, True)]
    assert method.queue.shape == (64, 16)
    teacher = dict(method.teacher_projector.named_parameters())
    assert all(torch.equal(p, teacher[n]) for n, p in method.projector.named_parameters())


def test_method_loss_is_fp32_under_bf16_autocast_and_the_queue_stays_fp32_normalised():
    method = _method(queue_size=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = method(_batch())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert method.queue.dtype == torch.float32
    torch.testing.assert_close(method.queue[:16].norm(dim=1), torch.ones(16), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ two processes
def _two_rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # same model and queue on both ranks
        method = ISD(_TinyBackbone(size=4), queue_size=64, predictor_hidden=8).train()
        torch.manual_seed(1 + rank)  # different local data
        views = [torch.randn(16, 3, 4, 4), torch.randn(16, 3, 4, 4)]
        with torch.no_grad():
            keys = F.normalize(method.teacher_backbone(views[0]), dim=1)  # teacher = student before any step
        method(Views(views=views))
        out = {"queue": method.queue.clone(), "ptr": int(method.queue_ptr), "keys": keys}
        try:
            ISD(_TinyBackbone(size=4), queue_size=48)(Views(views=views))
        except ValueError as e:
            out["error"] = str(e)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(not (hasattr(os, "fork") and torch.distributed.is_available()
                         and torch.distributed.is_gloo_available()), reason="needs fork and the gloo backend")
def test_two_processes_enqueue_the_gathered_keys_in_rank_order_into_identical_queues(tmp_path):
    import torch.multiprocessing as mp

    # fork: no re-import of torch in the children (spawn costs ~10 s on two shared cores)
    ctx = mp.start_processes(_two_rank_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=False,
                             start_method="fork")
    deadline = time.monotonic() + 60
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("two-rank worker did not finish in 60 s")
    out = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.equal(out[0]["queue"], out[1]["queue"])
    assert out[0]["ptr"] == out[1]["ptr"] == 32
    torch.testing.assert_close(out[0]["queue"][:32], torch.cat([out[0]["keys"], out[1]["keys"]]), atol=1e-6, rtol=0)
    assert "global batch 32 (per-process batch x 2 processes)" in out[0]["error"]

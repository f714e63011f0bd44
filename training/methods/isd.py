"""ISD: Iterative Similarity Distillation (Tejankar, Koohpayegani, Pillai, Favaro, Pirsiavash; ICCV 2021).

Reference: UMBCvision/ISD @ 4bdd603 (`train_isd.py` = the ResNet-18 recipe, `train_isd_plus.py` =
the ResNet-50 recipe), as described in `docs/methods/isd.md`.
Written from that description; nothing is copied.

A student (backbone [-> projector] -> predictor) matches the similarity distribution of an EMA
teacher (backbone [-> projector]) over a FIFO queue of past teacher keys: `isd_loss`,
KL(p_teacher || p_student), batch mean. The two views are never compared directly.
Views: `batch.views[0]` is the teacher (key, weak) view, `batch.views[1]` the student (query,
strong) view.

Recipes through hyperparameters (recipe `method:` section):
- ResNet-18 (`train_isd.py`, the default here): `projector=False`, embeddings = backbone features
  (512-d), predictor `Linear(512, 512, bias=False) -> BN -> ReLU -> Linear(512, 512)`
  (`predictor_hidden=512`), `t_student = t_teacher = 0.02`, `momentum=0.999`, `queue_size=128000`.
- ResNet-50 (`train_isd_plus.py`): `projector=True, proj_hidden=4096, proj_dim=512,
  predictor_hidden=4096, t_teacher=0.01, t_student=0.1, momentum=0.99`: projector (student and
  teacher) `Linear(2048, 4096) -> BN -> ReLU -> Linear(4096, 512)`, predictor
  `Linear(512, 4096) -> BN -> ReLU -> Linear(4096, 512)`, every Linear with bias (the authors'
  `get_mlp(feat, 2 feat, feat / 4)` and `get_mlp(feat / 4, 2 feat, feat / 4)`). Their R18 variant
  of that script (`run_isd_plus.sh`) is `proj_hidden=1024, proj_dim=128, predictor_hidden=1024,
  t_teacher=0.02, t_student=0.2, momentum=0.99`.
  Note: the default `proj_hidden=2048` matches neither script; a recipe with `projector: true`
  should set proj_hidden / proj_dim / predictor_hidden explicitly as above.

Memory: the queue is `queue_size x D` fp32, 128000 x 512 x 4 B = 262 MB (250 MiB), checkpointed
as a buffer. Each training step also holds a snapshot copy of it (another 262 MB, as the authors'
`queue.clone()`) and B x K similarity matrices (131 MB each in fp32 at B = 256; about three are
kept for the backward). No chunking: the softmax normalises over all K columns, so chunking would
only save memory with recomputation, which is not worth it at these sizes.

Deliberate differences from the authors' code, and why:
1. Queue rows are L2-normalised at initialisation (`normalize(dim=1)`), as `train_isd_plus.py`
   does. `train_isd.py` (the ResNet-18 recipe) normalises the COLUMNS (`dim=0`), a bug: its initial
   rows have norm ~sqrt(D/K) ~ 0.06, so until the random rows are overwritten (K/B = 500 steps)
   the logits are ~16x too small (<= ~3 instead of <= 50) and the teacher targets low-contrast.
   Not copied.
2. The EMA (`ema_update`) also copies the student's BatchNorm buffers into the teacher; the
   authors average parameters only and the teacher keeps its own running statistics. Training is
   unaffected (the teacher runs in train mode on batch statistics); the copy makes the teacher
   usable in eval mode, and the authors' own "teacher" k-NN evaluation uses the student's
   running statistics as well.
3. No ShuffleBN. In one process a shuffle before BN is an exact no-op (BN over the whole batch);
   the authors' shuffle only matters with DataParallel's per-GPU BN. Under DDP the trainer's
   SyncBatchNorm (if enabled) makes it moot too. Without SyncBN each rank's teacher normalises its
   local batch unshuffled; the leak ShuffleBN guards against in MoCo (query and its positive key
   normalised in the same BN batch) matters less here, as ISD never compares the two views directly.
4. The EMA and the enqueue only happen in training mode (`self.training`); a forward in eval mode
   computes the loss against the current queue and changes no state. The authors only call
   forward while training.
5. Keys of all processes are gathered (`gather_no_grad`) before the FIFO write, so the queue is
   the same on every rank and `queue_size` must be a multiple of the GLOBAL batch (checked, with
   the nearest valid sizes in the error); the authors run one DataParallel process.
6. The loss runs in fp32 (fp64 kept) with autocast disabled (temperatures of 0.01-0.02 give
   logits up to +-100; bf16 logits would visibly change the targets, docs/methods/isd.md §9), and uses
   `kl_div(log p_s, log p_t, log_target=True)` instead of `kl_div(log_softmax, softmax)`: the same
   value up to rounding, with the teacher's log-probabilities taken from log_softmax directly
   instead of re-taking the log of its softmax (inexact for probabilities that underflow in fp32).
7. `isd_loss` normalises q and k itself and detaches k; the authors normalise in forward and get
   a gradient-free k from `torch.no_grad()`. Same result.
8. No label "purity" diagnostic (the authors log the fraction of the teacher's top-5 queue
   neighbours with the query's label): the method sees no labels. No queue of labels either.
Same as the authors (chosen deliberately): the teacher runs in TRAIN mode (batch statistics; the
authors' `isd.train()` puts `encoder_k` in train mode, and the trainer's `method.train()` does so
here); the EMA momentum is constant; the EMA update runs at the START of forward, before the keys
are computed, i.e. with the student weights of the previous optimiser step
(`after_optimizer_step` does nothing); the batch's own keys are enqueued after the similarities
are taken, so they are not in the queue of their own step.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from training.distributed import gather_no_grad
from training.methods.base import SSLMethod, ema_update, momentum_copy, no_autocast
from training.methods.heads import mlp
from training.views import Views
from zoo.distributed import world_size



def isd_loss(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t_student: float,
             t_teacher: float) -> torch.Tensor:
    """ISD's similarity-distillation loss.

    q: student outputs `[B, D]`, k: teacher outputs `[B, D]` (both before L2-normalisation; the
    function normalises them), queue: `[K, D]` L2-normalised past teacher keys a_j. With
    q^ = q/|q|, k^ = k/|k|:

        p_t(b, j) = softmax_j(k^_b . a_j / t_teacher),    p_s(b, j) = softmax_j(q^_b . a_j / t_student)
        L = 1/B * sum_b sum_j p_t(b, j) * (log p_t(b, j) - log p_s(b, j))        (KL(p_t || p_s), batchmean)

    The teacher side carries no gradient (k is detached). Computed in fp32 at least (fp64 stays
    fp64) with autocast disabled.
    """
    if q.dim() != 2 or q.shape != k.shape:
        raise ValueError(f"isd_loss expects q and k of the same shape [B, D], got {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    if queue.dim() != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(f"isd_loss expects a queue [K, {q.shape[1]}], got {tuple(queue.shape)}")
    with no_autocast(q.device):
        dtype = torch.promote_types(torch.promote_types(q.dtype, queue.dtype), torch.float32)
        bank = queue.detach().to(dtype)
        q_hat = F.normalize(q.to(dtype), dim=1)
        k_hat = F.normalize(k.detach().to(dtype), dim=1)
        log_p_s = F.log_softmax(q_hat @ bank.T / t_student, dim=1)
        log_p_t = F.log_softmax(k_hat @ bank.T / t_teacher, dim=1)
        return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)


class ISD(SSLMethod):
    """ISD with an EMA teacher and a FIFO queue of teacher keys (see the module docstring for recipes).

    hparams: queue_size (128000), t_student (0.02), t_teacher (0.02), momentum (0.999, constant),
    projector (False), proj_dim (512), proj_hidden (2048), predictor_hidden (512).
    State (in `state_dict()`): `teacher_backbone.*`, `teacher_projector.*`, `queue` `[K, D]`,
    `queue_ptr`.
    """

    name: ClassVar[str] = "isd"

    def __init__(self, backbone: nn.Module, queue_size: int = 128000, t_student: float = 0.02,
                 t_teacher: float = 0.02, momentum: float = 0.999, projector: bool = False, proj_dim: int = 512,
                 proj_hidden: int = 2048, predictor_hidden: int = 512):
        super().__init__(backbone)
        if queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {queue_size}")
        if t_student <= 0 or t_teacher <= 0:
            raise ValueError(f"temperatures must be > 0, got t_student={t_student}, t_teacher={t_teacher}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.queue_size, self.momentum = int(queue_size), float(momentum)
        self.t_student, self.t_teacher = float(t_student), float(t_teacher)
        self.use_projector = bool(projector)
        feat = backbone.feature_dim
        if self.use_projector:
            # train_isd_plus.py: get_mlp everywhere, every Linear with bias.
            self.projector: nn.Module = mlp((feat, proj_hidden, proj_dim))
            dim = proj_dim
            self.predictor = mlp((dim, predictor_hidden, dim))
        else:
            # train_isd.py: no projector; hidden Linear bias-free (BN follows), output Linear with bias.
            self.projector = nn.Identity()
            dim = feat
            self.predictor = mlp((dim, predictor_hidden, dim), bias=False, last_bias=True)
        self.dim = dim
        # Copies made after the student heads exist, so teacher and student start identical.
        self.teacher_backbone = momentum_copy(self.backbone)
        self.teacher_projector = momentum_copy(self.projector)
        self.register_buffer("queue", F.normalize(torch.randn(self.queue_size, dim), dim=1))  # rows, see point 1
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def _momentum_update(self) -> None:
        ema_update(self.teacher_backbone, self.backbone, self.momentum)
        ema_update(self.teacher_projector, self.projector, self.momentum)

    def _check_queue(self, global_batch: int) -> None:
        if self.queue_size % global_batch != 0:
            below = self.queue_size // global_batch * global_batch
            near = f"{below} or {below + global_batch}" if below else f"{global_batch}"
            raise ValueError(f"isd: queue_size={self.queue_size} is not a multiple of the global batch {global_batch} "
                             f"(per-process batch x {world_size()} processes); use queue_size={near}")

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        """FIFO: overwrite the oldest `len(keys)` rows (K is a multiple of the batch, so never wraps)."""
        ptr = int(self.queue_ptr)
        self.queue[ptr:ptr + keys.shape[0]] = keys.to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + keys.shape[0]) % self.queue_size)

    def forward(self, batch: Views) -> tuple[torch.Tensor, dict[str, Any]]:
        if len(batch.views) != 2:
            raise ValueError(f"isd takes exactly 2 views per image (teacher view first, then student view), got "
                             f"{len(batch.views)}; check the recipe's augmentation section")
        x_teacher, x_student = batch.views
        self._check_queue(x_teacher.shape[0] * world_size())
        q = self.predictor(self.projector(self.backbone(x_student)))
        with torch.no_grad():
            if self.training:
                self._momentum_update()  # before the keys: previous step's student weights, as the authors
            k = self.teacher_projector(self.teacher_backbone(x_teacher))
        # Snapshot: the enqueue below writes in place, and autograd keeps the queue for q's gradient.
        queue = self.queue.clone() if self.training else self.queue
        loss = isd_loss(q, k, queue, self.t_student, self.t_teacher)
        if self.training:
            with no_autocast(k.device):
                keys = F.normalize(k.float(), dim=1)
            self._enqueue(gather_no_grad(keys))  # after the similarities: own keys never in own queue
        return loss, {"loss": loss.detach()}

"""CLIP-style contrastive loss across DDP ranks, with a gradient-carrying all-gather and a learnable temperature.

Distributed contrastive loss
----------------------------
:func:`contrastive_loss` gathers the L2-normalised embeddings of every rank with
:func:`gather_with_grad`, and each rank scores ITS local rows against ALL gathered columns
(image->text and text->image). The gather's backward sums, over ranks, the gradient every rank's
loss sends to a row and hands each rank the slice of its own rows. So the gradient that reaches
rank ``r``'s encoders is the gradient of ``S = sum_r' L_r'`` (every rank's loss), and DDP, which
averages parameter gradients over the ``W`` ranks, applies ``(1 / W) dS / dtheta``.

Each rank's loss is weighted ``L_r = (W / N) * sum_{i local} l_i`` with ``N`` the global batch
(the sum of the local batches, gathered) and ``l_i = (ce_i2t_i + ce_t2i_i) / 2``. Then
``S / W = (1 / N) sum_i l_i`` is exactly the single-process loss on the concatenated global batch,
so (a) the mean of the ranks' losses (what ``self.log(..., sync_dist=True)`` reports) equals the
global-batch loss and (b) DDP's averaged parameter gradients equal the global-batch gradients --
also when the local batches differ in size (e.g. the last batch of an epoch). With equal local
batches ``W / N = 1 / n_local`` and ``L_r`` is just the mean over the local rows; with unequal ones
a rank's loss is its local sum scaled by ``W / N`` (not its local mean: a plain local mean would
over-weight the rows of the smaller rank).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from volfm import VolfmError

__all__ = [
    "ContrastiveLogits",
    "LogitScale",
    "contrastive_logits",
    "contrastive_loss",
    "gather_with_grad",
]


# ----------------------------------------------------------------------------------------------------------------------
# gathering with gradients


def _distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _all_gather_rows(meta: Tensor, group=None) -> Tensor:
    """All-gather a small 1-D int64 tensor (same length on every rank); returns (world, len)."""
    out = [torch.empty_like(meta) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, meta.contiguous(), group=group)
    return torch.stack(out)


class _GatherWithGrad(torch.autograd.Function):
    """forward: all-gather (padded to the largest local batch) and concatenate along dim 0;
    backward: all-reduce(sum) the gradient of the gathered tensor, return this rank's slice."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: tuple[int, ...], group) -> Tensor:  # noqa: D102
        ctx.sizes, ctx.group = sizes, group
        ctx.rank = dist.get_rank(group)
        m = max(sizes)
        x = x.contiguous()
        if x.shape[0] < m:
            x = torch.cat([x, x.new_zeros((m - x.shape[0],) + tuple(x.shape[1:]))])
        bufs = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(bufs, x, group=group)
        return torch.cat([b[:s] for b, s in zip(bufs, sizes)])

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start: start + ctx.sizes[ctx.rank]], None, None


def _gather(x: Tensor, sizes: tuple[int, ...], group=None) -> Tensor:
    return _GatherWithGrad.apply(x, tuple(int(s) for s in sizes), group)


def gather_with_grad(x: Tensor, group=None) -> Tensor:
    """All-gather ``x`` along dim 0 over the ranks of ``group``, keeping the autograd graph.

    Returns the concatenation ``[x_rank0; x_rank1; ...]`` (shape ``(sum of local sizes, *x.shape[1:])``),
    identical on every rank. Local batches may differ in size (sizes are gathered first, then the
    tensors padded to the largest, gathered and stripped); the trailing dims must agree.

    Gradient semantics: if every rank ``r`` computes a loss ``L_r`` from the gathered tensor, the
    gradient returned to rank ``r``'s ``x`` is ``d(sum_r' L_r') / d x_r`` -- the gathered gradients
    are all-reduced (summed) over the ranks and each rank keeps the slice of its own rows (same as
    ``torch.distributed.nn.functional.all_gather``, which needs equal sizes). Combined with DDP's
    gradient *averaging*, the parameters see ``(1 / W) d(sum_r L_r) / d theta``.

    Every rank of ``group`` must call it (it is a collective, forward and backward). Identity when
    torch.distributed is not initialised or the group has one rank.
    """
    if not _distributed(group):
        return x
    sizes = _all_gather_rows(torch.tensor([x.shape[0]], dtype=torch.int64, device=x.device), group)[:, 0]
    return _gather(x, tuple(sizes.tolist()), group)


# ----------------------------------------------------------------------------------------------------------------------
# temperature


class LogitScale(nn.Module):
    """CLIP's learnable temperature: stores ``log(1 / init_temperature)``; ``forward()`` gives the
    multiplier ``exp(log_scale)`` clamped to ``max_scale`` (CLIP: init 0.07 -> 14.29, max 100).

    While training, ``forward`` also clamps the stored value itself to ``log(max_scale)`` (in place,
    without gradient), as CLIP does after each step, so a saturated scale still receives a gradient
    and can come back down. ``learnable=False`` keeps it as a fixed buffer.
    """

    def __init__(self, init_temperature: float = 0.07, max_scale: float = 100.0, learnable: bool = True):
        super().__init__()
        if not init_temperature > 0 or not max_scale > 0:
            raise VolfmError(f"LogitScale needs init_temperature > 0 and max_scale > 0; got init_temperature="
                             f"{init_temperature}, max_scale={max_scale}")
        if 1.0 / init_temperature > max_scale * (1 + 1e-6):
            raise VolfmError(f"LogitScale: 1 / init_temperature = {1.0 / init_temperature:g} exceeds max_scale="
                             f"{max_scale:g}; raise init_temperature or max_scale")
        self.max_scale, self.learnable = float(max_scale), bool(learnable)
        value = torch.tensor(math.log(1.0 / init_temperature))
        if learnable:
            self.log_scale = nn.Parameter(value)
        else:
            self.register_buffer("log_scale", value)

    def forward(self) -> Tensor:
        """The logit multiplier (a 0-d tensor), ``<= max_scale``."""
        log_max = math.log(self.max_scale)
        if self.learnable and self.training:
            with torch.no_grad():
                self.log_scale.clamp_(max=log_max)
        return self.log_scale.clamp(max=log_max).exp()

    @property
    def temperature(self) -> float:
        """The current temperature ``1 / scale`` (a Python float, for logging)."""
        return float(1.0 / torch.exp(self.log_scale.detach().clamp(max=math.log(self.max_scale))))

    def extra_repr(self) -> str:
        return f"temperature={self.temperature:.4g}, max_scale={self.max_scale:g}, learnable={self.learnable}"


# ----------------------------------------------------------------------------------------------------------------------
# contrastive (InfoNCE / CLIP)


class ContrastiveLogits(NamedTuple):
    """Logits of this rank's rows against the whole (gathered) batch.

    ``image_to_text``: ``(n_local, N)``, row i = scale * <image_i, text_j> for every text j of the
    global batch; ``text_to_image``: the same for the local texts against all images; ``labels``:
    ``(n_local,)`` int64, the column of each row's own pair (local index + this rank's offset);
    ``global_batch``: N. Top-k accuracy / recall: ``(logits.argmax(1) == labels)``.
    """

    image_to_text: Tensor
    text_to_image: Tensor
    labels: Tensor
    global_batch: int


def _shape_problem(image_emb: Tensor, text_emb: Tensor) -> str | None:
    if image_emb.ndim != 2 or text_emb.ndim != 2 or image_emb.shape != text_emb.shape:
        return (f"image_emb and text_emb must both be (batch, dim) with the same batch and dim; got image "
                f"{tuple(image_emb.shape)} and text {tuple(text_emb.shape)}")
    return None


def _check_global_batch(n: int) -> None:
    if n < 2:
        raise VolfmError(f"InfoNCE needs at least 2 pairs in a batch; raise batch_size or use drop_last=True so "
                         f"that a last batch of 1 is skipped (the global batch has {n})")


def contrastive_logits(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float, gather: bool = True,
                       group=None) -> ContrastiveLogits:
    """The scaled cosine-similarity logits behind :func:`contrastive_loss` (see there for the arguments).

    Collective when ``gather`` and torch.distributed is initialised: every rank must call it.
    """
    if not (gather and _distributed(group)):
        problem = _shape_problem(image_emb, text_emb)
        if problem:
            raise VolfmError(problem)
        n = image_emb.shape[0]
        _check_global_batch(n)
        img, txt = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
        labels = torch.arange(n, device=img.device)
        return ContrastiveLogits(logit_scale * img @ txt.T, logit_scale * txt @ img.T, labels, n)

    # Validate shapes on all ranks together (one small gather), so that a bad batch on one rank raises
    # the same error everywhere instead of leaving the other ranks waiting in a collective.
    ok = image_emb.ndim == 2 and text_emb.ndim == 2
    meta = torch.tensor([int(ok), image_emb.shape[0] if ok else -1, text_emb.shape[0] if ok else -1,
                         image_emb.shape[-1] if ok else -1, text_emb.shape[-1] if ok else -1],
                        dtype=torch.int64, device=image_emb.device)
    metas = _all_gather_rows(meta, group).tolist()
    rank = dist.get_rank(group)
    for r, (r_ok, ni, nt, di, dt) in enumerate(metas):
        if not r_ok or ni != nt or di != dt:
            mine = _shape_problem(image_emb, text_emb) if r == rank else None
            raise VolfmError(mine or f"image_emb and text_emb must both be (batch, dim) with the same batch and dim;"
                             f" rank {r} gave image ({ni}, {di}) and text ({nt}, {dt})")
    dims = {m[3] for m in metas}
    if len(dims) > 1:
        raise VolfmError(f"embedding dims differ between ranks: {[m[3] for m in metas]}; every rank must use the "
                         "same projection heads")
    sizes = tuple(m[1] for m in metas)
    n_global = sum(sizes)
    _check_global_batch(n_global)

    img, txt = F.normalize(image_emb, dim=-1), F.normalize(text_emb, dim=-1)
    img_all, txt_all = _gather(img, sizes, group), _gather(txt, sizes, group)
    offset = sum(sizes[:rank])
    labels = torch.arange(offset, offset + sizes[rank], device=img.device)
    # Local rows against all gathered columns (the local rows use the local tensors directly; their
    # copies inside img_all/txt_all get their column gradients back through the gather's backward).
    return ContrastiveLogits(logit_scale * img @ txt_all.T, logit_scale * txt @ img_all.T, labels, n_global)


def contrastive_loss(image_emb: Tensor, text_emb: Tensor, logit_scale: Tensor | float, gather: bool = True,
                     return_logits: bool = False, group=None) -> Tensor | tuple[Tensor, ContrastiveLogits]:
    """Symmetric InfoNCE (CLIP): ``0.5 * (CE(image->text) + CE(text->image))`` over the global batch.

    ``image_emb``, ``text_emb``: ``(n_local, D)`` projections of matching pairs (row i of both is one
    study); they are L2-normalised here. ``logit_scale``: the multiplier (``LogitScale()()``, i.e.
    1 / temperature), a 0-d tensor or a float. ``gather``: under torch.distributed, score the local
    rows against the embeddings of every rank (:func:`gather_with_grad`); ``False`` keeps each rank's
    negatives local (cheaper, a different and weaker objective). ``return_logits``: also return the
    :class:`ContrastiveLogits` (for retrieval metrics; not detached).

    Loss weighting (see the module docstring): each rank returns ``(W / N) * sum of its rows' losses``
    (``W`` ranks, ``N`` pairs in the global batch). So the mean over ranks of the returned losses is
    the single-process loss on the concatenated batch, and DDP's averaged parameter gradients are its
    gradients, also for unequal local batches; with equal local batches it is the local mean. Without
    distributed (or with ``gather=False``) it is the plain mean over the local batch.

    Raises VolfmError on mismatched shapes (checked across ranks, so every rank raises) and when the
    global batch has fewer than 2 pairs; a local batch of 1 (or 0) is fine when the global one has 2+.
    """
    out = contrastive_logits(image_emb, text_emb, logit_scale, gather=gather, group=group)
    i2t = F.cross_entropy(out.image_to_text, out.labels, reduction="sum")
    t2i = F.cross_entropy(out.text_to_image, out.labels, reduction="sum")
    world = dist.get_world_size(group) if (gather and _distributed(group)) else 1
    loss = 0.5 * (i2t + t2i) * (world / out.global_batch)
    return (loss, out) if return_logits else loss

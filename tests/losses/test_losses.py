"""Losses: CLIP contrastive loss against a hand-written reference and, under 2-process gloo DDP, against
the single-process big batch (loss and every parameter gradient); masked multi-label BCE / focal loss."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from volfm import VolfmError
from volfm.losses import (
    LogitScale,
    contrastive_logits,
    contrastive_loss,
    gather_with_grad,
    multilabel_loss,
    pos_weight_from_counts,
)

F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------------------
# independent reference


def reference_clip_loss(img, txt, scale):
    """Symmetric InfoNCE with explicit loops: per row -log softmax of its own pair, both directions."""
    img = img / img.norm(dim=1, keepdim=True)
    txt = txt / txt.norm(dim=1, keepdim=True)
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        i2t = torch.stack([scale * (img[i] * txt[j]).sum() for j in range(n)])
        t2i = torch.stack([scale * (txt[i] * img[j]).sum() for j in range(n)])
        total = total + (torch.logsumexp(i2t, 0) - i2t[i]) + (torch.logsumexp(t2i, 0) - t2i[i])
    return total / (2 * n)


def reference_row_losses(img, txt, scale):
    """l_i = (CE_i2t_i + CE_t2i_i) / 2 from the full similarity matrix."""
    img, txt = F.normalize(img, dim=1), F.normalize(txt, dim=1)
    sim = scale * img @ txt.T
    labels = torch.arange(img.shape[0])
    return 0.5 * (F.cross_entropy(sim, labels, reduction="none") + F.cross_entropy(sim.T, labels, reduction="none"))


def _pairs(n, d=8, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------------
# contrastive loss, single process


@pytest.mark.parametrize("n,seed,scale", [(2, 0, 1.0), (5, 1, 14.3), (7, 2, 3.0)])
def test_contrastive_loss_matches_reference(n, seed, scale):
    img, txt = _pairs(n, seed=seed)
    img.requires_grad_(True)
    txt.requires_grad_(True)
    loss = contrastive_loss(img, txt, torch.tensor(scale, dtype=F64))
    gi, gt = torch.autograd.grad(loss, (img, txt))
    ref = reference_clip_loss(img, txt, scale)
    ri, rt = torch.autograd.grad(ref, (img, txt))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-12)
    torch.testing.assert_close(gi, ri, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gt, rt, rtol=1e-10, atol=1e-12)
    # a float scale gives the same
    assert contrastive_loss(img, txt, scale).item() == pytest.approx(ref.item(), rel=1e-12)


def test_contrastive_loss_perfect_alignment_random_and_symmetry():
    b = 6
    eye = torch.eye(b, 10, dtype=F64) * 3.0  # orthogonal, so off-diagonal similarities are 0
    aligned = contrastive_loss(eye, eye * 0.5, 100.0)
    assert 0 <= aligned.item() < 1e-30 + (b - 1) * math.exp(-100) * 1.01
    assert contrastive_loss(eye, eye, 1e-9).item() == pytest.approx(math.log(b), rel=1e-6)  # scale -> 0: log B
    img, txt = _pairs(16, d=2048, seed=3)
    assert contrastive_loss(img, txt, 1.0).item() == pytest.approx(math.log(16), abs=0.1)  # random, cos ~ 0
    a, t = _pairs(5, seed=4)
    assert contrastive_loss(a, t, 7.0).item() == pytest.approx(contrastive_loss(t, a, 7.0).item(), rel=1e-13)
    # mismatching pairs cost more than matching ones
    assert contrastive_loss(a, a + 0.1 * t, 10.0) < contrastive_loss(a, t, 10.0)


def test_contrastive_logits_for_metrics():
    img, txt = _pairs(4, seed=5)
    loss, out = contrastive_loss(img, txt, 2.0, return_logits=True)
    assert out.image_to_text.shape == (4, 4) and out.global_batch == 4
    assert out.labels.tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(out.text_to_image, out.image_to_text.T)
    torch.testing.assert_close(out.image_to_text, 2.0 * F.normalize(img, dim=1) @ F.normalize(txt, dim=1).T)
    again = contrastive_logits(img, txt, 2.0)
    torch.testing.assert_close(again.image_to_text, out.image_to_text)
    assert loss.item() == pytest.approx(reference_clip_loss(img, txt, 2.0).item(), rel=1e-12)


def test_contrastive_loss_errors():
    a = torch.randn(4, 8)
    with pytest.raises(VolfmError, match=r"got image \(4, 8\) and text \(3, 8\)"):
        contrastive_loss(a, torch.randn(3, 8), 1.0)
    with pytest.raises(VolfmError, match=r"got image \(4, 8\) and text \(4, 6\)"):
        contrastive_loss(a, torch.randn(4, 6), 1.0)
    with pytest.raises(VolfmError, match=r"got image \(4, 2, 4\)"):
        contrastive_loss(a.reshape(4, 2, 4), a.reshape(4, 2, 4), 1.0)
    with pytest.raises(VolfmError, match=r"InfoNCE needs at least 2 pairs in a batch; raise batch_size.*has 1\)"):
        contrastive_loss(a[:1], a[:1], 1.0)


def test_gather_with_grad_is_identity_without_distributed():
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x


# ----------------------------------------------------------------------------------------------------------------------
# LogitScale


def test_logit_scale():
    s = LogitScale()
    assert s().item() == pytest.approx(1 / 0.07, rel=1e-6) and s.temperature == pytest.approx(0.07, rel=1e-6)
    assert [n for n, _ in s.named_parameters()] == ["log_scale"]
    s().backward()
    assert s.log_scale.grad.item() == pytest.approx(1 / 0.07, rel=1e-6)  # d exp(x) / dx
    with torch.no_grad():
        s.log_scale.fill_(math.log(500.0))
    s.eval()
    assert s().item() == pytest.approx(100.0) and s.log_scale.item() == pytest.approx(math.log(500.0))
    s.train()
    s.log_scale.grad = None
    out = s()
    assert out.item() == pytest.approx(100.0) and s.log_scale.item() == pytest.approx(math.log(100.0))
    out.backward()  # at the bound the gradient still flows, so the scale can come back down
    assert s.log_scale.grad.item() == pytest.approx(100.0)

    fixed = LogitScale(init_temperature=0.5, learnable=False)
    assert list(fixed.parameters()) == [] and "log_scale" in dict(fixed.named_buffers())
    assert fixed().item() == pytest.approx(2.0) and not fixed().requires_grad
    assert LogitScale(init_temperature=0.01).forward().item() == pytest.approx(100.0)
    with pytest.raises(VolfmError, match="exceeds max_scale"):
        LogitScale(init_temperature=0.001)
    with pytest.raises(VolfmError, match="init_temperature > 0"):
        LogitScale(init_temperature=0.0)


# ----------------------------------------------------------------------------------------------------------------------
# multi-label


def test_multilabel_gamma0_is_bce_and_pos_weight_is_torchs():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g, dtype=F64)
    targets = (torch.rand(6, 5, generator=g) > 0.6).to(F64)
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    assert multilabel_loss(logits, targets).item() == pytest.approx(bce.item(), rel=1e-13)
    assert multilabel_loss(logits, targets, focal_gamma=0.0).item() == pytest.approx(bce.item(), rel=1e-13)
    pw = torch.tensor([1.0, 3.0, 0.5, 10.0, 2.0], dtype=F64)
    ref = nn.BCEWithLogitsLoss(pos_weight=pw)(logits, targets)
    assert multilabel_loss(logits, targets, pos_weight=pw).item() == pytest.approx(ref.item(), rel=1e-13)
    ref_sum = nn.BCEWithLogitsLoss(pos_weight=pw, reduction="sum")(logits, targets)
    assert multilabel_loss(logits, targets, pos_weight=pw, reduction="sum").item() == pytest.approx(ref_sum.item())
    assert multilabel_loss(logits, targets, reduction="none").shape == (6, 5)


def test_focal_loss_hand_values():
    x = [2.0, -1.0, 0.5, -3.0]
    y = [1.0, 0.0, 0.0, 1.0]
    gamma, alpha = 2.0, 0.25

    def focal(xi, yi, a=None):
        p = 1 / (1 + math.exp(-xi))
        pt = p if yi == 1 else 1 - p
        at = 1.0 if a is None else (a if yi == 1 else 1 - a)
        return -at * (1 - pt) ** gamma * math.log(pt)

    logits, targets = torch.tensor(x, dtype=F64), torch.tensor(y, dtype=F64)
    got = multilabel_loss(logits, targets, focal_gamma=gamma, reduction="none")
    assert got.tolist() == pytest.approx([focal(a, b) for a, b in zip(x, y)], rel=1e-12)
    got = multilabel_loss(logits, targets, focal_gamma=gamma, focal_alpha=alpha)
    assert got.item() == pytest.approx(sum(focal(a, b, alpha) for a, b in zip(x, y)) / 4, rel=1e-12)
    # e.g. x=2, y=1: p=0.8808, (1-p)^2 * -log p = 0.0142 * 0.1269
    assert focal(2.0, 1.0) == pytest.approx(0.00180, abs=1e-5)
    # focal down-weights the easy example far more than the hard one
    easy, hard = multilabel_loss(torch.tensor([4.0, -4.0]), torch.tensor([1.0, 1.0]), focal_gamma=2.0,
                                 reduction="none")
    bce = F.binary_cross_entropy_with_logits(torch.tensor([4.0, -4.0]), torch.tensor([1.0, 1.0]), reduction="none")
    assert easy / bce[0] < 1e-3 and hard / bce[1] > 0.9


def test_focal_loss_is_finite_for_confident_logits():
    logits = torch.tensor([[200.0, -200.0, 30.0, -30.0]], requires_grad=True)
    loss = multilabel_loss(logits, torch.tensor([[1.0, 0.0, 0.0, 1.0]]), focal_gamma=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


def test_missing_targets_are_ignored():
    logits = torch.tensor([[1.0, -2.0, 0.3], [0.5, 2.0, -1.0]], dtype=F64, requires_grad=True)
    targets = torch.tensor([[1.0, float("nan"), 0.0], [-1.0, 1.0, 0.0]], dtype=F64)
    keep = torch.tensor([[True, False, True], [False, True, True]])
    pw = torch.tensor([2.0, 3.0, 4.0], dtype=F64)
    for kw in ({}, {"pos_weight": pw}, {"focal_gamma": 2.0, "focal_alpha": 0.3}):
        loss = multilabel_loss(logits, targets, **kw)
        full = multilabel_loss(logits, torch.where(keep, targets, torch.zeros_like(targets)), reduction="none", **kw)
        assert loss.item() == pytest.approx(full[keep].mean().item(), rel=1e-13)
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.isfinite(grad).all() and (grad[~keep] == 0).all() and (grad[keep] != 0).all()
    none = multilabel_loss(logits, targets, reduction="none")
    assert (none[~keep] == 0).all()
    assert multilabel_loss(logits, targets, reduction="sum").item() == pytest.approx(none.sum().item())
    all_missing = multilabel_loss(logits, torch.full_like(targets, -1.0))
    assert all_missing.item() == 0.0 and all_missing.requires_grad


def test_multilabel_errors():
    with pytest.raises(VolfmError, match=r"logits \(2, 3\) and targets \(2, 4\)"):
        multilabel_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(VolfmError, match=r"pos_weight must be \(C,\)"):
        multilabel_loss(torch.zeros(2, 3), torch.zeros(2, 3), pos_weight=torch.ones(4))
    with pytest.raises(VolfmError, match="focal_gamma"):
        multilabel_loss(torch.zeros(2, 3), torch.zeros(2, 3), focal_gamma=-1)
    with pytest.raises(VolfmError, match="reduction"):
        multilabel_loss(torch.zeros(2, 3), torch.zeros(2, 3), reduction="avg")


def test_pos_weight_from_counts():
    pw = pos_weight_from_counts([10, 0, 50, 100, 1], 100)
    assert pw.dtype == torch.float32
    assert pw.tolist() == pytest.approx([9.0, 100.0, 1.0, 0.0, 99.0])
    assert pos_weight_from_counts([10, 0, 50], 100, clip=20).tolist() == pytest.approx([9.0, 20.0, 1.0])
    assert pos_weight_from_counts([10, 0, 80], 100, clip=(0.5, 5.0)).tolist() == pytest.approx([5.0, 5.0, 0.5])
    assert pos_weight_from_counts(torch.tensor([2, 3]), torch.tensor([10, 4])).tolist() == pytest.approx([4.0, 1 / 3])
    with pytest.raises(VolfmError, match="no positives"):
        pos_weight_from_counts([1, 0], 10, clip=None)
    with pytest.raises(VolfmError, match=r"in \[0, n\]"):
        pos_weight_from_counts([11], 10)


# ----------------------------------------------------------------------------------------------------------------------
# DDP: 2 processes, gloo, against the single-process big batch


class TwoTower(nn.Module):
    """Projection heads for "image" and "text" features plus a learnable temperature."""

    def __init__(self):
        super().__init__()
        self.image = nn.Linear(6, 4)
        self.text = nn.Linear(5, 4)
        self.scale = LogitScale(init_temperature=0.25)

    def forward(self, img, txt):
        return self.image(img), self.text(txt), self.scale()


def _model():
    torch.manual_seed(0)
    return TwoTower().to(F64)


def _features(n):
    g = torch.Generator().manual_seed(11)
    return torch.randn(n, 6, generator=g, dtype=F64), torch.randn(n, 5, generator=g, dtype=F64)


# case name -> (local batch of rank 0, of rank 1), gather
DDP_CASES = {
    "equal": ((3, 3), True),
    "unequal": ((3, 2), True),
    "one_row": ((1, 3), True),
    "empty_rank": ((3, 0), True),
    "no_gather": ((3, 3), False),
}


def _ddp_worker(rank, world, out_dir):
    """Runs in a child process (this file run as a script): every case, results to out_dir/rank{r}.pt."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world)
    res = {}
    for name, (sizes, gather) in DDP_CASES.items():
        img, txt = _features(sum(sizes))
        lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
        model = DDP(_model())
        ie, te, scale = model(img[lo:hi], txt[lo:hi])
        loss, out = contrastive_loss(ie, te, scale, gather=gather, return_logits=True)
        loss.backward()
        res[name] = {"loss": loss.detach(), "i2t": out.image_to_text.detach(), "labels": out.labels,
                     "grads": {k: p.grad.clone() for k, p in model.module.named_parameters()}}

    # gather_with_grad on its own, unequal sizes: forward concatenates, backward sums over ranks
    sizes = (3, 2)
    x = torch.arange(sizes[rank] * 2, dtype=F64).reshape(-1, 2).add(100 * rank).requires_grad_(True)
    g = gather_with_grad(x)
    weights = torch.arange(10, dtype=F64).reshape(5, 2) * (rank + 1) + rank
    (g * weights).sum().backward()
    res["gather"] = {"gathered": g.detach(), "grad": x.grad}

    # errors raise on every rank (no rank is left waiting in a collective)
    errors = {}
    for name, (n_img, n_txt) in {"mismatch": ((2, 2), (2, 1)), "too_small": ((1, 0), (1, 0))}.items():
        try:
            contrastive_loss(torch.randn(n_img[rank], 4), torch.randn(n_txt[rank], 4), 1.0)
            errors[name] = "no error"
        except VolfmError as e:
            errors[name] = str(e)
    res["errors"] = errors
    dist.barrier()
    dist.destroy_process_group()
    torch.save(res, f"{out_dir}/rank{rank}.pt")


# Variables an earlier Lightning DDP test in the same pytest process may have left behind; the workers
# get their rank and world size on the command line and rendezvous through a file.
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK",
             "NODE_RANK", "TORCHELASTIC_RUN_ID")


def _run_workers(out, timeout):
    env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV and not k.startswith("PL_")}
    env.update(GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, str(r), "2", str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    try:
        return procs, [p.communicate(timeout=timeout)[0].decode(errors="replace") for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.communicate()
        return procs, None


@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    # one retry in a fresh folder: on a loaded 2-core machine a gloo rendezvous over loopback has been seen to
    # stall once, and a rank has been seen to abort in gloo's C++ teardown ("terminate called without an active
    # exception", SIGABRT; a fresh-clone CI run of 2026-12-04, not reproduced in 3 reruns); a real deadlock or error
    # in the code under test fails both attempts
    for _attempt in range(2):
        out = tmp_path_factory.mktemp("ddp")
        procs, logs = _run_workers(out, timeout=90)
        if logs is None:
            continue
        if not any(p.returncode == -6 and "terminate called" in log for p, log in zip(procs, logs)):
            break
    else:
        if logs is None:
            pytest.fail("the 2-process gloo run did not finish in 90 s, twice (a collective left waiting?)")
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} failed:\n{log[-4000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _single_process(n):
    """Loss, row losses, logits and parameter grads of the whole batch in one process."""
    model = _model()
    img, txt = _features(n)
    ie, te, scale = model(img, txt)
    loss, out = contrastive_loss(ie, te, scale, return_logits=True)
    loss.backward()
    rows = reference_row_losses(ie.detach(), te.detach(), scale.detach())
    assert loss.item() == pytest.approx(reference_clip_loss(ie, te, scale).item(), rel=1e-12)
    return loss.detach(), rows, out.image_to_text.detach(), {k: p.grad for k, p in model.named_parameters()}


@pytest.mark.parametrize("case", ["equal", "unequal", "one_row", "empty_rank"])
def test_ddp_gathered_loss_and_grads_equal_the_single_process_big_batch(ddp, case):
    (n0, n1), _ = DDP_CASES[case]
    n, world = n0 + n1, 2
    loss, rows, logits, grads = _single_process(n)
    rank_losses = [ddp[r][case]["loss"] for r in range(world)]
    # (a) the mean over ranks of the losses is the big-batch loss ...
    assert (sum(rank_losses) / world).item() == pytest.approx(loss.item(), rel=1e-12)
    # ... because each rank returns (W / N) * (sum of its rows' losses); equal halves: its local mean
    for r, (lo, hi) in enumerate([(0, n0), (n0, n)]):
        assert rank_losses[r].item() == pytest.approx((world / n * rows[lo:hi].sum()).item(), rel=1e-12, abs=1e-15)
        if case == "equal":
            assert rank_losses[r].item() == pytest.approx(rows[lo:hi].mean().item(), rel=1e-12)
        # local rows against all columns, labels offset by the rank's start
        torch.testing.assert_close(ddp[r][case]["i2t"], logits[lo:hi])
        assert ddp[r][case]["labels"].tolist() == list(range(lo, hi))
    # (b) every parameter's DDP-averaged gradient is the big-batch gradient, on both ranks
    assert set(grads) == {"image.weight", "image.bias", "text.weight", "text.bias", "scale.log_scale"}
    for r in range(world):
        for k, gk in grads.items():
            torch.testing.assert_close(ddp[r][case]["grads"][k], gk, rtol=1e-9, atol=1e-12, msg=f"rank {r} {k}")
    assert all(g.abs().max() > 1e-3 for g in grads.values())  # not trivially zero


def test_ddp_without_gather_differs(ddp):
    """gather=False: each rank sees only its own negatives, so the gradients are NOT the big-batch ones."""
    loss, _, _, grads = _single_process(6)
    img, txt = _features(6)
    for r, (lo, hi) in enumerate([(0, 3), (3, 6)]):
        m = _model()
        local = contrastive_loss(*m(img[lo:hi], txt[lo:hi]))
        assert ddp[r]["no_gather"]["loss"].item() == pytest.approx(local.item(), rel=1e-12)
        assert ddp[r]["no_gather"]["i2t"].shape == (3, 3)
    diff = max((ddp[0]["no_gather"]["grads"][k] - g).abs().max().item() for k, g in grads.items())
    assert diff > 1e-3
    assert abs((ddp[0]["no_gather"]["loss"] + ddp[1]["no_gather"]["loss"]).item() / 2 - loss.item()) > 1e-3


def test_gather_with_grad_unequal_sizes(ddp):
    x0 = torch.arange(6, dtype=F64).reshape(3, 2)
    x1 = torch.arange(4, dtype=F64).reshape(2, 2) + 100
    full = torch.cat([x0, x1])
    w = [torch.arange(10, dtype=F64).reshape(5, 2) * (r + 1) + r for r in range(2)]
    total = w[0] + w[1]  # d(sum_r L_r) / d gathered
    for r in range(2):
        torch.testing.assert_close(ddp[r]["gather"]["gathered"], full)
    torch.testing.assert_close(ddp[0]["gather"]["grad"], total[:3])
    torch.testing.assert_close(ddp[1]["gather"]["grad"], total[3:])


def test_ddp_errors_raise_on_every_rank(ddp):
    for r in range(2):
        assert "rank 1 gave image (2, 4) and text (1, 4)" in ddp[r]["errors"]["mismatch"] or (
            r == 1 and "got image (2, 4) and text (1, 4)" in ddp[r]["errors"]["mismatch"])
        assert ddp[r]["errors"]["too_small"].startswith("InfoNCE needs at least 2 pairs in a batch; raise batch_size")
        assert ddp[r]["errors"]["too_small"].endswith("(the global batch has 1)")


if __name__ == "__main__":  # a rank of the DDP fixture: python test_losses.py RANK WORLD OUT_DIR
    _ddp_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])

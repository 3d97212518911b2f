"""Reconstruction losses of masked-image pretraining against formulas written here: the voxel MSE counts the
masked voxels only (value and gradient), the token MSE the masked tokens only, with MAE's per-patch
normalisation of the targets."""
import pytest
import torch

from volfm import VolfmError
from volfm.losses import masked_mse, masked_token_mse, normalize_patches


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _volumes(b=2, c=2, size=(4, 5, 3), seed=0):
    p = torch.randn(b, c, *size, generator=_g(seed))
    t = torch.randn(b, c, *size, generator=_g(seed + 1))
    m = torch.rand(b, 1, *size, generator=_g(seed + 2)) < 0.4
    return p, t, m


# --------------------------------------------------------------------------------------------- voxels
def test_masked_mse_equals_the_mean_over_masked_voxels():
    p, t, m = _volumes()
    sq, n = 0.0, 0
    for b in range(p.shape[0]):
        for c in range(p.shape[1]):
            sel = m[b, 0]
            sq += float(((p[b, c][sel] - t[b, c][sel]) ** 2).sum())
            n += int(sel.sum())
    want = sq / n
    assert n > 0
    assert abs(float(masked_mse(p, t, m)) - want) < 1e-5 * max(1.0, want)
    # a per-channel mask gives the same as the broadcast one when it repeats it
    assert torch.allclose(masked_mse(p, t, m.expand_as(p)), masked_mse(p, t, m))


def test_masked_mse_ignores_visible_voxels_in_value_and_gradient():
    p, t, m = _volumes(seed=3)
    base = masked_mse(p, t, m)
    noise = torch.randn(p.shape, generator=_g(9)) * 100
    vis = (~m).expand_as(p)
    assert torch.equal(masked_mse(torch.where(vis, p + noise, p), t, m), base)
    assert torch.equal(masked_mse(p, torch.where(vis, t - noise, t), m), base)
    # but a masked voxel does count
    assert not torch.equal(masked_mse(torch.where(~vis, p + 1, p), t, m), base)
    q = p.clone().requires_grad_(True)
    masked_mse(q, t, m).backward()
    assert torch.all(q.grad[vis] == 0)
    n = m.expand_as(p).sum()
    torch.testing.assert_close(q.grad[~vis], (2 * (p - t) / n)[~vis])


def test_masked_mse_errors():
    p, t, m = _volumes()
    with pytest.raises(VolfmError, match="no voxel"):
        masked_mse(p, t, torch.zeros_like(m))
    with pytest.raises(VolfmError, match="differ in shape"):
        masked_mse(p, t[:, :1], m)


# --------------------------------------------------------------------------------------------- tokens
def _tokens(b=3, n=10, d=8, seed=0):
    p = torch.randn(b, n, d, generator=_g(seed))
    t = torch.randn(b, n, d, generator=_g(seed + 1)) * 2 + 3
    masked = torch.rand(b, n, generator=_g(seed + 2)) < 0.6
    masked[:, 0] = True  # every row has a masked token
    masked[:, 1] = False  # and a visible one
    return p, t, masked


def _token_formula(p, t, masked):
    """Mean over masked tokens of the per-token MSE, by loops."""
    vals = []
    for b in range(p.shape[0]):
        for i in range(p.shape[1]):
            if masked[b, i]:
                vals.append(float(((p[b, i] - t[b, i]) ** 2).mean()))
    return sum(vals) / len(vals)


def test_masked_token_mse_without_norm_pix():
    p, t, masked = _tokens()
    got = float(masked_token_mse(p, t, masked, norm_pix=False))
    want = _token_formula(p, t, masked)
    assert abs(got - want) < 1e-5 * max(1.0, want)


def test_masked_token_mse_with_norm_pix_uses_per_patch_normalised_targets():
    p, t, masked = _tokens(seed=4)
    mean = t.mean(-1, keepdim=True)
    var = ((t - mean) ** 2).sum(-1, keepdim=True) / (t.shape[-1] - 1)  # unbiased
    tn = (t - mean) / torch.sqrt(var + 1e-6)
    torch.testing.assert_close(normalize_patches(t), tn)
    assert torch.allclose(tn.mean(-1), torch.zeros(()), atol=1e-5)
    assert torch.allclose(tn.var(-1), torch.ones(()), atol=1e-4)
    got = float(masked_token_mse(p, t, masked, norm_pix=True))
    want = _token_formula(p, tn, masked)
    assert abs(got - want) < 1e-5 * max(1.0, want)
    assert abs(got - _token_formula(p, t, masked)) > 1e-2  # normalising does change the loss here
    # a constant patch normalises to zeros (eps keeps it finite)
    flat = torch.full((1, 2, 8), 5.0)
    assert torch.equal(normalize_patches(flat), torch.zeros_like(flat))


@pytest.mark.parametrize("norm_pix", [False, True])
def test_masked_token_mse_ignores_visible_tokens(norm_pix):
    p, t, masked = _tokens(seed=7)
    base = masked_token_mse(p, t, masked, norm_pix=norm_pix)
    vis = (~masked).unsqueeze(-1).expand_as(p)
    noise = torch.randn(p.shape, generator=_g(11)) * 50
    assert torch.equal(masked_token_mse(torch.where(vis, p + noise, p), t, masked, norm_pix=norm_pix), base)
    assert torch.equal(masked_token_mse(p, torch.where(vis, t + noise, t), masked, norm_pix=norm_pix), base)
    assert not torch.equal(masked_token_mse(torch.where(~vis, p + 1, p), t, masked, norm_pix=norm_pix), base)
    q = p.clone().requires_grad_(True)
    masked_token_mse(q, t, masked, norm_pix=norm_pix).backward()
    assert torch.all(q.grad[vis] == 0) and q.grad[~vis].abs().sum() > 0


def test_masked_token_mse_errors():
    p, t, masked = _tokens()
    with pytest.raises(VolfmError, match="no token is masked"):
        masked_token_mse(p, t, torch.zeros_like(masked))
    with pytest.raises(VolfmError, match="do not match"):
        masked_token_mse(p, t, masked[:, :-1])
    with pytest.raises(VolfmError, match="do not match"):
        masked_token_mse(p, t[..., :-1], masked)

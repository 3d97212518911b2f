"""3D ViT: positional-embedding interpolation, pooling, anisotropic patches, backward, save/load; attention, a
block and the whole forward against references written here from their definitions (nn.MultiheadAttention, an
explicit softmax(q k^T / sqrt(d)) v, F.layer_norm/F.gelu), and the 3D sin-cos table against its formula."""
import math

import pytest
import torch
import torch.nn.functional as F

from volfm import VolfmError
from volfm.models import create_encoder, load_encoder, save_encoder
from volfm.models.vit3d import Attention, Block, ViT3d, default_block_indices, interpolate_pos_embed, sincos_pos_embed_3d

SMALL = dict(img_size=(32, 32, 16), patch_size=8, embed_dim=48, depth=4, num_heads=4)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(SMALL)
    cfg.update(kw)
    return ViT3d(**cfg).eval()


def _x(*spatial, seed=0, b=2):
    return torch.randn(b, 1, *spatial, generator=torch.Generator().manual_seed(seed))


def _randomize(module, seed=0, std=0.3):
    """Every parameter random (biases and LayerNorm affine included), so no term of a reference is trivially 0/1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
            if "norm" in name and name.endswith("weight"):  # LayerNorm gains around 1
                p.add_(1.0)
    return module


def _ref_attention(attn, x, heads):
    """Multi-head self-attention from the module's weights only, by its definition (no F.scaled_dot_product_attention):
    qkv = x W^T + b split into q | k | v (each E wide, heads as consecutive E/heads-wide slices),
    softmax(q k^T / sqrt(E/heads)) v per head, heads concatenated, then the output projection."""
    B, N, E = x.shape
    d = E // heads
    qkv = x @ attn.qkv.weight.T + (attn.qkv.bias if attn.qkv.bias is not None else 0.0)
    q, k, v = qkv[..., :E], qkv[..., E:2 * E], qkv[..., 2 * E:]
    out = torch.empty(B, N, E, dtype=x.dtype)
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        logits = torch.einsum("bnd,bmd->bnm", q[..., sl], k[..., sl]) / math.sqrt(d)
        w = torch.exp(logits - logits.amax(-1, keepdim=True))
        out[..., sl] = torch.einsum("bnm,bmd->bnd", w / w.sum(-1, keepdim=True), v[..., sl])
    return out @ attn.proj.weight.T + attn.proj.bias


def _ref_block(blk, x, heads):
    """Pre-norm transformer block: x + attn(LN1(x)), then + fc2(GELU(fc1(LN2(x)))); LayerNorm eps 1e-6, exact GELU."""
    E = x.shape[-1]
    h = F.layer_norm(x, (E,), blk.norm1.weight, blk.norm1.bias, eps=1e-6)
    x = x + _ref_attention(blk.attn, h, heads)
    h = F.layer_norm(x, (E,), blk.norm2.weight, blk.norm2.bias, eps=1e-6)
    h = h @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias
    h = 0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))
    return x + h @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias


def _ref_sincos(grid, E, temperature=10000.0):
    """The documented convention, written out: token n = (i, j, k) in raster order (k fastest); channels
    [0, E/3) encode i, [E/3, 2E/3) j, [2E/3, E) k; within an axis's third the first E/6 channels are
    sin(p * temperature ** (-f / (E/6))), f = 0 .. E/6 - 1, and the next E/6 the cos of the same angles."""
    third, half = E // 3, E // 6
    rows = []
    for i in range(grid[0]):
        for j in range(grid[1]):
            for k in range(grid[2]):
                row = [0.0] * E
                for axis, p in enumerate((i, j, k)):
                    for f in range(half):
                        angle = p * temperature ** (-f / half)
                        row[axis * third + f] = math.sin(angle)
                        row[axis * third + half + f] = math.cos(angle)
                rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("pos", ["learned", "sincos"])
def test_native_size_uses_the_stored_pos_embed(pos):
    model = _model(pos_embed=pos)
    assert model.grid_size == (4, 4, 2)
    assert model.pos_embed_for((4, 4, 2)) is model.pos_embed
    # Resampling to the same grid is the identity.
    assert torch.equal(interpolate_pos_embed(model.pos_embed, (4, 4, 2), (4, 4, 2)), model.pos_embed)
    x = _x(32, 32, 16)
    with torch.no_grad():
        out = model.forward_features(x)
        # Reference without any interpolation path: patch embed + stored pos embed, by hand (conv3d, the block
        # and the final LayerNorm written out here, not the model's modules).
        tok = F.conv3d(x, model.patch_embed.weight, model.patch_embed.bias, stride=8).flatten(2).transpose(1, 2)
        tok = torch.cat([model.cls_token.expand(2, -1, -1), tok + model.pos_embed], dim=1)
        for blk in model.blocks:
            tok = _ref_block(blk, tok, heads=4)
        tok = F.layer_norm(tok, (48,), model.norm.weight, model.norm.bias, eps=1e-6)
        ref = tok[:, 1:].transpose(1, 2).reshape(2, 48, 4, 4, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos", ["learned", "sincos"])
def test_other_input_size_interpolates(pos):
    model = _model(pos_embed=pos)
    x = _x(48, 24, 40)
    with torch.no_grad():
        feats = model.forward_features(x)
        inter = model.forward_intermediates(x)
        pooled = model.forward_pooled(x)
    assert feats.shape == (2, 48, 6, 3, 5)
    assert [tuple(f.shape) for f in inter] == [(2, 48, 6, 3, 5)] * len(model.feature_info)
    torch.testing.assert_close(inter[-1], feats)
    assert pooled.shape == (2, 48) and torch.isfinite(pooled).all()
    pe = model.pos_embed_for((6, 3, 5))
    assert pe.shape == (1, 90, 48)
    # Trilinear resampling of a field constant along an axis keeps it constant along that axis.
    const = torch.ones(1, 32, 48)
    torch.testing.assert_close(interpolate_pos_embed(const, (4, 4, 2), (6, 3, 5)), torch.ones(1, 90, 48))


@pytest.mark.parametrize("heads, qkv_bias", [(4, True), (1, True), (3, False)])
def test_attention_matches_multihead_attention_and_the_formula(heads, qkv_bias):
    """The attention module against nn.MultiheadAttention loaded with its weights (qkv = MHA's stacked q|k|v
    in-projection, proj = out_proj) and against softmax(q k^T / sqrt(d)) v written out per head."""
    attn = _randomize(Attention(48, heads, qkv_bias=qkv_bias), seed=1).eval()
    mha = torch.nn.MultiheadAttention(48, heads, bias=True, batch_first=True).eval()
    x = torch.randn(2, 7, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.qkv.weight)
        mha.in_proj_bias.copy_(attn.qkv.bias if qkv_bias else torch.zeros(3 * 48))
        mha.out_proj.weight.copy_(attn.proj.weight)
        mha.out_proj.bias.copy_(attn.proj.bias)
        out = attn(x)
        ref_mha, _ = mha(x, x, x, need_weights=False)
        ref = _ref_attention(attn, x, heads)
    assert out.shape == (2, 7, 48)
    torch.testing.assert_close(ref_mha, ref, atol=1e-5, rtol=1e-5)  # the two references agree with each other
    torch.testing.assert_close(out, ref_mha, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("drop_path", [0.0, 0.5])
def test_block_matches_an_independent_pre_norm_block(drop_path):
    """One block (eval: drop path is the identity) against x + attn(LN1(x)), + MLP(LN2(x)) written out here."""
    blk = _randomize(Block(48, 4, mlp_ratio=2.0, drop_path=drop_path), seed=3).eval()
    x = torch.randn(2, 9, 48, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(blk(x), _ref_block(blk, x, heads=4), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pos", ["learned", "sincos"])
def test_forward_matches_an_independent_reference(pos):
    """The whole encoder on a grid with three different sides (4, 3, 2), every weight random: Conv3d patches, the
    pos embed (the sin-cos formula for "sincos"), the CLS token, the blocks and the final LayerNorm by hand."""
    model = _randomize(_model(img_size=(32, 24, 16), pos_embed=pos), seed=5).eval()
    x = _x(32, 24, 16, seed=6)
    pos_ref = _ref_sincos((4, 3, 2), 48).float() if pos == "sincos" else model.pos_embed[0]
    with torch.no_grad():
        tokens, grid = model.forward_tokens(x)
        tok = F.conv3d(x, model.patch_embed.weight, model.patch_embed.bias, stride=8).flatten(2).transpose(1, 2)
        tok = torch.cat([model.cls_token.expand(2, -1, -1), tok + pos_ref], dim=1)
        for blk in model.blocks:
            tok = _ref_block(blk, tok, heads=4)
        ref = F.layer_norm(tok, (48,), model.norm.weight, model.norm.bias, eps=1e-6)
    assert grid == (4, 3, 2) and tokens.shape == (2, 1 + 24, 48)
    torch.testing.assert_close(tokens, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("grid, E, temperature", [((4, 3, 2), 48, 10000.0), ((2, 5, 3), 36, 10000.0),
                                                  ((3, 2, 4), 12, 100.0)])
def test_sincos_matches_the_documented_formula(grid, E, temperature):
    """sincos_pos_embed_3d against the convention its docstring states, written out in _ref_sincos: axis thirds
    in (i, j, k) order, sin then cos, frequencies temperature ** (-f / (E/6)); sides all different so a swapped
    axis cannot hide."""
    ref = _ref_sincos(grid, E, temperature)
    # 10000 is the default temperature: called without it there
    got = sincos_pos_embed_3d(grid, E, temperature) if temperature != 10000.0 else sincos_pos_embed_3d(grid, E)
    assert got.shape == (math.prod(grid), E) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=0)
    # spot checks by hand: token (0, 0, 0) is sin 0 = 0 / cos 0 = 1 in every third; token 1 is k = 1 (raster order)
    half = E // 6
    assert torch.equal(got[0], torch.tensor(([0.0] * half + [1.0] * half) * 3))
    assert got[1, 2 * E // 3] == pytest.approx(math.sin(1.0)) and got[1, 2 * E // 3 + half] == pytest.approx(math.cos(1.0))
    assert torch.equal(got[1, : 2 * E // 3], got[0, : 2 * E // 3])  # i and j unchanged from token 0


def test_sincos_is_fixed_and_deterministic():
    a, b = _model(seed=0, pos_embed="sincos"), _model(seed=1, pos_embed="sincos")
    assert "pos_embed" not in dict(a.named_parameters())
    assert "pos_embed" not in a.state_dict()  # rebuilt from the constructor, not stored
    assert torch.equal(a.pos_embed, b.pos_embed)
    torch.testing.assert_close(a.pos_embed[0], sincos_pos_embed_3d((4, 4, 2), 48))
    assert a.pos_embed.abs().max() <= 1.0
    # Distinct positions get distinct embeddings.
    assert torch.cdist(a.pos_embed[0], a.pos_embed[0]).fill_diagonal_(1.0).min() > 1e-3
    with pytest.raises(VolfmError, match="divisible by 6"):
        sincos_pos_embed_3d((2, 2, 2), 32)
    learned = _model(pos_embed="learned")
    assert isinstance(learned.pos_embed, torch.nn.Parameter) and "pos_embed" in learned.state_dict()


def test_cls_and_avg_pooling():
    x = _x(32, 32, 16)
    cls = _model(global_pool="cls")
    avg = _model(global_pool="avg")
    nocls = _model(global_pool="avg", cls_token=False)
    with torch.no_grad():
        tokens, grid = cls.forward_tokens(x)
        assert tokens.shape == (2, 1 + 32, 48) and grid == (4, 4, 2)
        p_cls = cls.forward_pooled(x)
        assert p_cls.shape == (2, 48)
        torch.testing.assert_close(p_cls, tokens[:, 0])
        p_avg = avg.forward_pooled(x)
        assert p_avg.shape == (2, 48)
        torch.testing.assert_close(p_avg, avg.forward_features(x).mean(dim=(2, 3, 4)))
        assert nocls.forward_tokens(x)[0].shape == (2, 32, 48)
        assert nocls.forward_pooled(x).shape == (2, 48)
    assert not torch.allclose(p_cls, p_avg)
    with pytest.raises(VolfmError, match="cls_token=True"):
        ViT3d(**SMALL, cls_token=False, global_pool="cls")


def test_anisotropic_patch():
    model = _model(img_size=(32, 32, 16), patch_size=(16, 16, 8))
    assert model.grid_size == (2, 2, 2)
    assert all(info["reduction"] == (16, 16, 8) for info in model.feature_info)
    with torch.no_grad():
        assert model.forward_features(_x(32, 32, 16)).shape == (2, 48, 2, 2, 2)
        assert model.forward_features(_x(64, 32, 24)).shape == (2, 48, 4, 2, 3)
    with pytest.raises(VolfmError, match="not divisible"):
        model.forward_features(_x(32, 32, 12))


def test_intermediates_indices():
    assert default_block_indices(12) == [2, 5, 8, 11]
    assert default_block_indices(2) == [0, 1]
    model = _model(depth=4)
    assert [f["module"] for f in model.feature_info] == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    x = _x(32, 32, 16)
    with torch.no_grad():
        a = model.forward_intermediates(x, indices=[1, -1], norm=False)
        b = model.forward_intermediates(x, norm=False)
    torch.testing.assert_close(a[0], b[1])
    torch.testing.assert_close(a[1], b[3])
    with pytest.raises(VolfmError, match="out of range"):
        model.forward_intermediates(x, indices=[4])


def test_backward_finite_with_drop_path_and_checkpointing():
    model = _model(drop_path_rate=0.1, grad_checkpointing=True).train()
    x = _x(48, 32, 16).requires_grad_(True)
    loss = sum(f.square().mean() for f in model.forward_intermediates(x)) + model.forward_pooled(x).square().mean()
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.pos_embed.grad.abs().sum() > 0  # learned pos embed gets gradients through interpolation


@pytest.mark.parametrize("pos", ["learned", "sincos"])
def test_save_load_round_trip(tmp_path, pos):
    torch.manual_seed(0)
    model = create_encoder("vit_tiny_3d", img_size=[32, 32, 16], patch_size=[16, 16, 8], depth=2, pos_embed=pos).eval()
    path = save_encoder(model, tmp_path / "vit.safetensors")
    rebuilt = load_encoder(path).eval()
    assert isinstance(rebuilt, ViT3d) and rebuilt.encoder_name == "vit_tiny_3d"
    assert rebuilt.patch_size == (16, 16, 8) and rebuilt.depth == 2 and rebuilt.num_features == 192
    x = _x(32, 32, 16, seed=1)
    with torch.no_grad():
        assert torch.equal(rebuilt.forward_features(x), model.forward_features(x))
        assert torch.equal(rebuilt.forward_pooled(x), model.forward_pooled(x))
        x2 = _x(48, 32, 24, seed=2)
        assert torch.equal(rebuilt.forward_features(x2), model.forward_features(x2))


def test_registered_sizes():
    for name, (e, heads) in {"vit_tiny_3d": (192, 3), "vit_small_3d": (384, 6), "vit_base_3d": (768, 12)}.items():
        m = create_encoder(name, depth=1)
        assert m.num_features == e and m.blocks[0].attn.num_heads == heads and m.patch_size == (16, 16, 16)
        assert m.grid_size == (14, 14, 10) and m.pos_embed.shape == (1, 1960, e)

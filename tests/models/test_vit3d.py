"""3D ViT: positional-embedding interpolation, pooling, anisotropic patches, backward, save/load."""
import pytest
import torch

from volfm import VolfmError
from volfm.models import create_encoder, load_encoder, save_encoder
from volfm.models.vit3d import ViT3d, default_block_indices, interpolate_pos_embed, sincos_pos_embed_3d

SMALL = dict(img_size=(32, 32, 16), patch_size=8, embed_dim=48, depth=4, num_heads=4)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = dict(SMALL)
    cfg.update(kw)
    return ViT3d(**cfg).eval()


def _x(*spatial, seed=0, b=2):
    return torch.randn(b, 1, *spatial, generator=torch.Generator().manual_seed(seed))


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
        # Reference without any interpolation path: patch embed + stored pos embed, by hand.
        tok = model.patch_embed(x) + model.pos_embed
        tok = torch.cat([model.cls_token.expand(2, -1, -1), tok], dim=1)
        for blk in model.blocks:
            tok = blk(tok)
        ref = model.norm(tok)[:, 1:].transpose(1, 2).reshape(2, 48, 4, 4, 2)
    torch.testing.assert_close(out, ref)


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

"""Masked-image pretraining parts: block and token masks (exact ratios, per-step generators), patchify against
PatchEmbed3d's own token layout, ViT3d.forward_masked against the full forward and a gather-then-blocks reference,
and the MAE decoder placing the visible tokens where ``keep`` says."""
import math

import pytest
import torch

from volfm import VolfmError
from volfm.models.mae import MAEDecoder, patchify, unpatchify
from volfm.models.masking import block_mask, mask_generator, masked_count, token_mask
from volfm.models.patch_embed import PatchEmbed3d
from volfm.models.vit3d import ViT3d, sincos_pos_embed_3d

TINY_VIT = dict(img_size=16, patch_size=4, embed_dim=24, depth=2, num_heads=2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: tiny tensors gain nothing from more, and on a small shared CPU the OpenMP barriers
    of two threads can make them many times slower; restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _vit(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = {**TINY_VIT, **kw}
    vit = ViT3d(**cfg).eval()
    with torch.no_grad():  # a visible CLS token and position table (both start near zero)
        if vit.cls_token is not None:
            vit.cls_token.normal_(0, 0.5)
        vit.pos_embed.normal_(0, 0.5)
    return vit


def _x(b=2, c=1, size=(16, 16, 16), seed=0):
    return torch.randn(b, c, *size, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ block_mask
def test_block_mask_exact_fraction_when_size_is_a_multiple_of_the_block():
    m = block_mask(3, (8, 8, 8), 2, 0.75, mask_generator(0, 0))
    assert m.shape == (3, 1, 8, 8, 8) and m.dtype == torch.bool
    per_sample = m.float().flatten(1).mean(1)
    assert torch.equal(per_sample, torch.full((3,), 0.75))
    # the samples are masked independently (not one pattern repeated)
    assert not torch.equal(m[0], m[1]) or not torch.equal(m[1], m[2])


def test_block_mask_is_constant_within_each_block():
    block = (2, 4, 1)
    m = block_mask(2, (8, 8, 4), block, 0.5, mask_generator(3, 1))
    tiles = m.reshape(2, 1, 4, 2, 2, 4, 4, 1)  # (B, 1, gi, bi, gj, bj, gk, bk)
    first = tiles[:, :, :, :1, :, :1, :, :1]
    assert torch.equal(tiles, first.expand_as(tiles))
    n_masked = first.flatten(1).sum(1)
    assert torch.equal(n_masked, torch.full((2,), 16))  # round(0.5 * 32) blocks


def test_block_mask_counts_blocks_when_the_size_is_not_a_multiple():
    size, block, ratio = (7, 5, 6), 3, 0.6
    grid = tuple(math.ceil(s / block) for s in size)  # (3, 2, 2): 12 blocks, the last ones cut at the border
    n = math.prod(grid)
    m = block_mask(4, size, block, ratio, mask_generator(1, 2))
    assert m.shape == (4, 1, *size)
    # every block's origin voxel exists (start < size), so it tells whether the block is masked
    origins = m[:, 0, ::block, ::block, ::block]
    assert origins.shape[1:] == grid
    assert torch.equal(origins.flatten(1).sum(1), torch.full((4,), round(ratio * n)))
    # and the block is masked throughout: upsampling the origins and cutting to size gives the mask back
    up = origins
    for axis in range(3):
        up = up.repeat_interleave(block, dim=1 + axis)
    assert torch.equal(up[:, : size[0], : size[1], : size[2]], m[:, 0])


def test_mask_generator_reproducible_and_distinct_per_step_and_rank():
    args = (4, (8, 8, 8), 2, 0.5)
    a = block_mask(*args, mask_generator(7, 10, 0))
    assert torch.equal(a, block_mask(*args, mask_generator(7, 10, 0)))
    for other in (mask_generator(7, 11, 0), mask_generator(7, 10, 1), mask_generator(8, 10, 0),
                  mask_generator(7, 10, 0, stream="other")):
        assert not torch.equal(a, block_mask(*args, other))
    # the global RNG is neither used nor advanced
    torch.manual_seed(0)
    before = torch.get_rng_state()
    block_mask(*args, mask_generator(7, 10, 0))
    token_mask(2, 16, 0.5, mask_generator(7, 10, 0))
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_the_open_interval_raises(ratio):
    with pytest.raises(VolfmError, match="mask ratio"):
        block_mask(1, (8, 8, 8), 2, ratio, mask_generator(0, 0))
    with pytest.raises(VolfmError, match="mask ratio"):
        token_mask(1, 16, ratio, mask_generator(0, 0))
    with pytest.raises(VolfmError):
        masked_count(10, ratio)


def test_masked_count_bounds():
    assert masked_count(10, 0.75) == 8  # round(7.5) (banker's rounding) = 8
    assert masked_count(64, 0.75) == 48
    assert masked_count(10, 0.01) == 1  # rounds to 0: at least one item is masked
    assert masked_count(10, 0.99) == 9  # rounds to 10: at least one item stays visible
    assert masked_count(2, 0.5) == 1
    for n in range(2, 30):
        for r in (0.01, 0.3, 0.5, 0.9, 0.999):
            assert 1 <= masked_count(n, r) <= n - 1
    with pytest.raises(VolfmError, match="at least 2"):
        masked_count(1, 0.5)
    with pytest.raises(VolfmError):  # one block only: nothing to see or nothing to reconstruct
        block_mask(1, (4, 4, 4), 4, 0.5, mask_generator(0, 0))


# ------------------------------------------------------------------------------------------ token_mask
def test_token_mask_keep_sorted_exact_count_and_complement():
    n, ratio = 27, 0.7
    keep, masked = token_mask(5, n, ratio, mask_generator(2, 3))
    n_keep = n - round(ratio * n)
    assert keep.shape == (5, n_keep) and masked.shape == (5, n) and masked.dtype == torch.bool
    assert torch.all(keep[:, 1:] > keep[:, :-1])  # ascending, no repeats
    assert int(keep.min()) >= 0 and int(keep.max()) < n
    kept = torch.zeros(5, n, dtype=torch.bool)
    kept.scatter_(1, keep, True)
    assert torch.equal(kept, ~masked)
    assert torch.equal(masked.sum(1), torch.full((5,), n - n_keep))
    assert len({tuple(r.tolist()) for r in keep}) > 1  # rows differ


# ------------------------------------------------------------------------------------------ patchify
def test_patchify_unpatchify_round_trip_anisotropic_two_channels():
    p, C = (4, 2, 2), 2
    x = _x(b=2, c=C, size=(8, 6, 4), seed=1)
    t = patchify(x, p)
    grid = (2, 3, 2)
    assert t.shape == (2, math.prod(grid), math.prod(p) * C)
    assert torch.equal(unpatchify(t, p, grid, channels=C), x)
    # token n holds exactly the voxels of the n-th patch in raster order
    gi, gj, gk = 1, 2, 0
    n = (gi * grid[1] + gj) * grid[2] + gk
    patch = x[:, :, gi * 4:(gi + 1) * 4, gj * 2:(gj + 1) * 2, gk * 2:(gk + 1) * 2]
    assert torch.equal(torch.sort(t[:, n], dim=1).values, torch.sort(patch.flatten(1), dim=1).values)
    with pytest.raises(VolfmError, match="not divisible"):
        patchify(_x(size=(8, 6, 5)), p)
    with pytest.raises(VolfmError, match="do not fit"):
        unpatchify(t, p, (2, 3, 3), channels=C)


@pytest.mark.parametrize("p,C", [((4, 2, 2), 2), ((2, 3, 1), 3), ((2, 2, 2), 1)])
def test_patchify_layout_matches_patch_embed3d(p, C):
    """An independent check of the token order and the (pi, pj, pk, C) in-patch layout: a PatchEmbed3d whose
    weight is one-hot (embedding dim e reads voxel (a, b, d) of channel c) must give patchify's rows."""
    D = math.prod(p) * C
    pe = PatchEmbed3d(in_chans=C, embed_dim=D, patch_size=p, backend="torch")
    w = torch.zeros(D, C, *p)
    for a in range(p[0]):
        for b in range(p[1]):
            for d in range(p[2]):
                for c in range(C):
                    w[((a * p[1] + b) * p[2] + d) * C + c, c, a, b, d] = 1.0
    with torch.no_grad():
        pe.weight.copy_(w)
        pe.bias.zero_()
    x = _x(b=2, c=C, size=(2 * p[0], 3 * p[1], 2 * p[2]), seed=4)
    with torch.no_grad():
        tokens = pe(x)
    torch.testing.assert_close(tokens, patchify(x, p), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------ forward_masked
def test_forward_masked_with_every_token_kept_equals_forward_tokens():
    vit = _vit()
    x = _x(b=2)
    n = math.prod(vit.grid_size)
    keep = torch.arange(n).expand(2, n)
    with torch.no_grad():
        full, grid = vit.forward_tokens(x)
        masked, grid_m = vit.forward_masked(x, keep)
    assert grid == grid_m == (4, 4, 4)
    assert masked.shape == (2, 1 + n, 24)
    torch.testing.assert_close(masked, full, rtol=1e-5, atol=1e-5)


def _gathered_reference(vit, x, keep):
    """The full path's embeddings (patch embedding + positions, CLS prepended: what forward_tokens feeds its
    blocks), the kept tokens gathered, then the same blocks and final norm."""
    tokens, _ = vit._tokens(x)
    P = vit.num_prefix_tokens
    idx = keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1])
    t = torch.cat([tokens[:, :P], torch.gather(tokens[:, P:], 1, idx)], dim=1)
    for blk in vit.blocks:
        t = blk(t)
    return vit.norm(t)


@pytest.mark.parametrize("cls_token", [True, False])
def test_forward_masked_feeds_the_kept_embeddings_to_the_blocks(cls_token):
    vit = _vit(cls_token=cls_token)
    x = _x(b=2, seed=3)
    keep, _ = token_mask(2, 64, 0.75, mask_generator(0, 0))
    with torch.no_grad():
        out, _ = vit.forward_masked(x, keep)
        ref = _gathered_reference(vit, x, keep)
    assert out.shape == (2, vit.num_prefix_tokens + 16, 24)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_forward_masked_ignores_dropped_patches_and_sees_kept_ones():
    vit = _vit(seed=1)
    x = _x(b=1, seed=5)
    grid = vit.grid_size
    keep = torch.tensor([[0, 5, 21, 42, 63]])
    dropped = 1  # token 1: patch (0, 0, 1)

    def patch_slice(n):
        gi, rem = divmod(n, grid[1] * grid[2])
        gj, gk = divmod(rem, grid[2])
        return (slice(None), slice(None), slice(gi * 4, gi * 4 + 4), slice(gj * 4, gj * 4 + 4),
                slice(gk * 4, gk * 4 + 4))

    with torch.no_grad():
        base, _ = vit.forward_masked(x, keep)
        y = x.clone()
        y[patch_slice(dropped)] += 10.0
        assert torch.equal(vit.forward_masked(y, keep)[0], base)
        z = x.clone()
        z[patch_slice(21)] += 10.0
        assert not torch.allclose(vit.forward_masked(z, keep)[0], base, atol=1e-3)


def test_forward_masked_is_permutation_equivariant_in_keep():
    """Blocks carry no position beyond the embedding added before the gather, so reordering ``keep`` reorders
    the outputs the same way: each output row belongs to the patch its index names."""
    vit = _vit(seed=2)
    x = _x(b=2, seed=6)
    keep, _ = token_mask(2, 64, 0.5, mask_generator(4, 0))
    perm = torch.randperm(keep.shape[1], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out, _ = vit.forward_masked(x, keep)
        out_p, _ = vit.forward_masked(x, keep[:, perm])
    torch.testing.assert_close(out_p[:, 0], out[:, 0], rtol=1e-5, atol=1e-5)  # CLS
    torch.testing.assert_close(out_p[:, 1:], out[:, 1:][:, perm], rtol=1e-5, atol=1e-5)


def test_forward_masked_rejects_bad_keep():
    vit = _vit()
    x = _x(b=2)
    for bad in (torch.tensor([[0, 64]]).expand(2, 2), torch.tensor([[-1, 3]]).expand(2, 2),
                torch.zeros(3, 4, dtype=torch.long), torch.arange(4), torch.zeros(2, 0, dtype=torch.long)):
        with pytest.raises(VolfmError, match="keep"):
            vit.forward_masked(x, bad)


# --------------------------------------------------------------------------------------- MAEDecoder
def _decoder(depth=1, seed=0, **kw):
    torch.manual_seed(seed)
    dec = MAEDecoder(embed_dim=24, patch_size=(4, 2, 2), in_chans=2, decoder_dim=12, depth=depth, num_heads=2,
                     **kw).eval()
    with torch.no_grad():
        dec.mask_token.normal_(0, 1.0)
        for name, p in dec.named_parameters():
            if name.startswith("norm.") or ".norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return dec


def test_mae_decoder_output_shape():
    dec = _decoder()
    grid = (2, 3, 2)
    keep, _ = token_mask(2, 12, 0.75, mask_generator(0, 1))
    visible = torch.randn(2, 1 + keep.shape[1], 24)
    out = dec(visible, keep, grid)
    assert out.shape == (2, 12, 4 * 2 * 2 * 2)
    with pytest.raises(VolfmError, match="keep"):
        dec(visible, keep[:, :-1], grid)
    with pytest.raises(VolfmError, match="divisible by 6"):
        MAEDecoder(24, 4, decoder_dim=16)


def test_mae_decoder_places_visible_tokens_at_their_indices():
    """Without decoder blocks the prediction of token n is pred(norm(x_n + pos_n)), where x_n is the embedded
    encoder output for a kept n and the mask token otherwise -- a formula from the parts."""
    dec = _decoder(depth=0, seed=1)
    grid = (2, 3, 2)
    n = 12
    keep, masked = token_mask(2, n, 0.5, mask_generator(5, 0))
    visible = torch.randn(2, 1 + keep.shape[1], 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = dec(visible, keep, grid)
        pos = sincos_pos_embed_3d(grid, 12)
        for b in range(2):
            for i, tok in enumerate(keep[b].tolist()):
                want = dec.pred(dec.norm(dec.embed(visible[b, 1 + i]) + pos[tok]))
                torch.testing.assert_close(out[b, tok], want, rtol=1e-5, atol=1e-5)
            for tok in masked[b].nonzero()[:, 0].tolist():
                want = dec.pred(dec.norm(dec.mask_token[0, 0] + pos[tok]))
                torch.testing.assert_close(out[b, tok], want, rtol=1e-5, atol=1e-5)


def test_mae_decoder_blocks_see_visible_tokens_at_their_places():
    dec = _decoder(depth=1, seed=2)
    grid = (2, 3, 2)
    keep, masked = token_mask(2, 12, 0.75, mask_generator(6, 0))
    visible = torch.randn(2, 1 + keep.shape[1], 24)
    seen = {}
    hook = dec.blocks[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0].detach().clone()))
    try:
        with torch.no_grad():
            dec(visible, keep, grid)
            y = dec.embed(visible[:, 1:])
    finally:
        hook.remove()
    full = seen["x"] - sincos_pos_embed_3d(grid, 12)[None]
    for b in range(2):
        torch.testing.assert_close(full[b, keep[b]], y[b], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(full[b, masked[b]], dec.mask_token[0].expand(int(masked[b].sum()), -1),
                                   rtol=1e-5, atol=1e-5)
    # and changing one visible token's encoder output changes the prediction of that token
    v2 = visible.clone()
    v2[0, 1 + 2] += 3.0
    with torch.no_grad():
        a, b2 = dec(visible, keep, grid), dec(v2, keep, grid)
    assert not torch.allclose(a[0, keep[0, 2]], b2[0, keep[0, 2]], atol=1e-4)
    torch.testing.assert_close(a[1], b2[1])  # the other sample is untouched
    # the prefix (CLS) token is dropped: changing it changes nothing
    v3 = visible.clone()
    v3[:, 0] += 5.0
    with torch.no_grad():
        torch.testing.assert_close(dec(v3, keep, grid), a)
    assert torch.isfinite(a).all()

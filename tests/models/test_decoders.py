"""Segmentation decoders: output sizes (odd, anisotropic), deep supervision, gradients, MONAI UNETR
as the reference for the UNETR decoder, skip wiring (every skip moves the output, per-stage shapes and
inputs, a known-answer U-Net decoder) and a tiny overfit on a synthetic sphere."""
import pytest
import torch

from volfm import VolfmError
from volfm.models import create_encoder
from volfm.models.decoders import SegmentationModel, UNetDecoder, UNETRDecoder, match_spatial_size, unetr_upsample_factors

RESNET = ("resnet18_3d", dict(base_channels=8))
VIT = ("vit_tiny_3d", dict(img_size=(32, 32, 32), patch_size=16))
VIT_ANISO = ("vit_tiny_3d", dict(img_size=(32, 32, 16), patch_size=(16, 16, 8)))


@pytest.fixture(autouse=True)
def _one_thread():
    # On a shared 2-core machine OpenMP's spinning threads make these small convs ~10x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(spec, num_classes=2, seed=0, **kw):
    torch.manual_seed(seed)
    name, enc_kw = spec
    return SegmentationModel(create_encoder(name, **enc_kw), num_classes, **kw)


def _x(*spatial, b=1, seed=0):
    return torch.randn(b, 1, *spatial, generator=torch.Generator().manual_seed(seed))


def _ceil(size, red):
    return tuple(-(-s // r) for s, r in zip(size, red))


def test_auto_picks_unet_for_cnn_and_unetr_for_vit():
    assert isinstance(_model(RESNET).decoder, UNetDecoder)
    vit = _model(VIT)
    assert isinstance(vit.decoder, UNETRDecoder) and vit.decoder_name == "unetr"
    assert vit.config["encoder"] == "vit_tiny_3d" and vit.config["encoder_kwargs"] == VIT[1]
    assert isinstance(_model(VIT, decoder="unet").decoder, UNetDecoder)  # explicit choice still works
    with pytest.raises(VolfmError, match="4 token maps at one reduction"):
        _model(RESNET, decoder="unetr")
    with pytest.raises(VolfmError, match="decoder must be one of"):
        _model(RESNET, decoder="fpn")


@pytest.mark.parametrize("size", [(32, 32, 32), (40, 36, 20), (33, 17, 9), (48, 32, 24)])
@pytest.mark.parametrize("pool_time_stride", [2, 1])
def test_unet_output_has_the_input_size(size, pool_time_stride):
    model = _model(("resnet18_3d", dict(base_channels=8, pool_time_stride=pool_time_stride)), num_classes=3).eval()
    with torch.no_grad():
        out = model(_x(*size, b=2))
    assert out.shape == (2, 3) + size
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("spec, size", [(VIT, (32, 32, 32)), (VIT, (48, 32, 64)), (VIT_ANISO, (32, 32, 16)),
                                        (VIT_ANISO, (48, 32, 24))])
def test_unetr_output_has_the_input_size(spec, size):
    model = _model(spec, num_classes=3).eval()
    with torch.no_grad():
        out = model(_x(*size))
    assert out.shape == (1, 3) + size


def test_unetr_input_not_divisible_by_patch_is_a_clear_error():
    model = _model(VIT).eval()
    with pytest.raises(VolfmError, match="not divisible by the patch size"):
        model(_x(40, 32, 32))


def test_unetr_factors_per_axis():
    assert unetr_upsample_factors((16, 16, 16)) == ((2, 2, 2), (2, 2, 2))  # MONAI's UNETR
    assert unetr_upsample_factors((16, 16, 8)) == ((2, 2, 2), (2, 2, 1))
    assert unetr_upsample_factors((32, 4, 1)) == ((2, 1, 1), (4, 4, 1))
    with pytest.raises(VolfmError, match="power-of-two"):
        unetr_upsample_factors((16, 16, 12))
    info = [{"num_chs": 48, "reduction": (12, 12, 12)}] * 4
    with pytest.raises(VolfmError, match="power-of-two"):
        UNETRDecoder(info, 1, 2)
    with pytest.raises(VolfmError, match="embed_dim=64 does not match"):
        UNETRDecoder([{"num_chs": 48, "reduction": 16}] * 4, 1, 2, embed_dim=64)


@pytest.mark.parametrize("spec, size", [(RESNET, (40, 36, 20)), (VIT, (32, 32, 48)), (VIT_ANISO, (32, 48, 16))])
def test_deep_supervision_list_in_training_tensor_in_eval(spec, size):
    model = _model(spec, num_classes=2, deep_supervision=True).train()
    outs = model(_x(*size))
    reds = model.output_reductions
    assert isinstance(outs, list) and len(outs) == len(reds) and reds[0] == (1, 1, 1)
    assert len(outs) == (5 if spec is RESNET else 4)
    for out, red in zip(outs, reds):
        assert out.shape == (1, 2) + _ceil(size, red), (red, out.shape)
    # Strictly coarser, highest resolution first.
    assert all(a != b and all(x <= y for x, y in zip(a, b)) for a, b in zip(reds, reds[1:]))
    model.eval()
    with torch.no_grad():
        out = model(_x(*size))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 2) + size
    if spec is VIT_ANISO:
        assert reds == [(1, 1, 1), (2, 2, 1), (4, 4, 2), (8, 8, 4)]


@pytest.mark.parametrize("spec", [RESNET, VIT])
def test_gradients_reach_encoder_and_decoder(spec):
    model = _model(spec, deep_supervision=True).train()
    outs = model(_x(32, 32, 32))
    sum(o.square().mean() for o in outs).backward()
    for part, params in (("encoder", model.encoder.named_parameters()), ("decoder", model.decoder.named_parameters())):
        params = list(params)
        missing = [n for n, p in params if p.grad is None]
        assert not missing, f"{part} parameters without gradient: {missing[:5]}"
        assert all(torch.isfinite(p.grad).all() for _, p in params)
        assert sum(int(p.grad.abs().sum() > 0) for _, p in params) > 0.9 * len(params), part
    enc_ids = {id(p) for p in model.encoder_parameters()}
    dec_ids = {id(p) for p in model.decoder_parameters()}
    assert not enc_ids & dec_ids and enc_ids | dec_ids == {id(p) for p in model.parameters()}


def test_unetr_decoder_equals_monai_unetr():
    """MONAI's UNETR decoder weights load into UNETRDecoder key for key and give the same logits
    from the same ViT hidden states."""
    from monai.networks.nets import UNETR

    torch.manual_seed(0)
    E, img = 48, (32, 32, 48)
    ref = UNETR(1, 3, img, feature_size=8, hidden_size=E, mlp_dim=96, num_heads=4).eval()
    ours = UNETRDecoder([{"num_chs": E, "reduction": (16, 16, 16)}] * 4, in_chans=1, num_classes=3,
                        feature_size=8).eval()
    dec_state = {k: v for k, v in ref.state_dict().items() if not k.startswith("vit.")}
    assert sum(p.numel() for p in ours.parameters()) == sum(
        p.numel() for n, p in ref.named_parameters() if not n.startswith("vit."))
    ours.load_state_dict(dec_state, strict=True)
    x = _x(*img, b=2)
    with torch.no_grad():
        last, hidden = ref.vit(x)
        maps = [ref.proj_feat(h) for h in (hidden[3], hidden[6], hidden[9], last)]
        torch.testing.assert_close(ours(maps, x), ref(x))


def test_unetr_param_count_matches_monai_for_default_config():
    from monai.networks.nets import UNETR

    ref = UNETR(1, 2, (96, 96, 96), feature_size=16, hidden_size=768, mlp_dim=3072, num_heads=12)
    ours = UNETRDecoder([{"num_chs": 768, "reduction": 16}] * 4, in_chans=1, num_classes=2, embed_dim=768)
    assert sum(p.numel() for p in ours.parameters()) == sum(
        p.numel() for n, p in ref.named_parameters() if not n.startswith("vit."))


def test_match_spatial_size_crops_and_pads_at_the_far_end():
    x = torch.arange(2 * 5 * 4 * 3, dtype=torch.float32).reshape(1, 2, 5, 4, 3)
    y = match_spatial_size(x, (4, 6, 3))
    assert y.shape == (1, 2, 4, 6, 3)
    assert torch.equal(y[:, :, :, :4], x[:, :, :4]) and not y[:, :, :, 4:].any()
    assert match_spatial_size(x, (5, 4, 3)) is x


def test_unet_decoder_options_and_errors():
    info = [{"num_chs": 8, "reduction": (2, 2, 1)}, {"num_chs": 16, "reduction": (4, 4, 2)},
            {"num_chs": 32, "reduction": (8, 8, 4)}]
    dec = UNetDecoder(info, in_chans=2, num_classes=4, channels=[4, 6, 10], norm="batch").eval()
    feats = [torch.randn(1, c, *_ceil((20, 12, 7), i["reduction"])) for c, i in zip((8, 16, 32), info)]
    assert dec(feats, torch.randn(1, 2, 20, 12, 7)).shape == (1, 4, 20, 12, 7)
    with pytest.raises(VolfmError, match="channels must be 3 positive ints"):
        UNetDecoder(info, 1, 2, channels=[4, 6])
    with pytest.raises(VolfmError, match="integer factors"):
        UNetDecoder(info[:1] + [{"num_chs": 16, "reduction": (3, 4, 2)}], 1, 2)
    with pytest.raises(VolfmError, match="bad decoder options"):
        _model(RESNET, feature_size=8)  # a UNETR option given to the U-Net decoder


# --------------------------------------------------------------------------- skip wiring


@pytest.mark.parametrize("spec, size", [(RESNET, (40, 36, 20)), (VIT, (32, 32, 32))], ids=["unet", "unetr"])
def test_every_skip_changes_the_output(spec, size):
    """Zeroing any one encoder map, or changing the raw input (the full-resolution skip), changes the logits; an
    overfit test cannot see a skip that is dropped, since the image alone (thresholded) segments the sphere."""
    model = _model(spec, num_classes=2).eval()
    x = _x(*size)
    with torch.no_grad():
        feats = model.encoder.forward_intermediates(x)
        base = model.decoder(feats, x)
        scale = base.abs().max()
        for i in range(len(feats)):
            zeroed = list(feats)
            zeroed[i] = torch.zeros_like(feats[i])
            diff = (model.decoder(zeroed, x) - base).abs().max()
            assert diff > 1e-3 * scale, f"encoder map {i} of {len(feats)} does not reach the output"
        diff = (model.decoder(feats, x + _x(*size, seed=1)) - base).abs().max()
        assert diff > 1e-3 * scale, "the raw-input skip does not reach the output"


def test_unet_stages_get_their_skips_and_give_their_shapes():
    """Each U-Net stage takes the deeper stage's output (the deepest map first) and the encoder map one level up
    (the raw-input skip at full resolution) and returns (B, channels[i], input size / reduction, rounded up)."""
    size = (40, 36, 20)
    model = _model(RESNET, num_classes=3).eval()
    dec = model.decoder
    x = _x(*size, b=2)
    reds = [(1, 1, 1)] + [tuple(i["reduction"]) for i in model.encoder.feature_info]
    calls = {}
    hooks = [st.register_forward_hook(lambda m, args, out, i=i: calls.__setitem__(i, (args, out)))
             for i, st in enumerate(dec.stages)]
    try:
        with torch.no_grad():
            feats = model.encoder.forward_intermediates(x)
            out = dec(feats, x)
    finally:
        for h in hooks:
            h.remove()
    n = len(dec.stages)
    assert n == len(feats) == 5 and sorted(calls) == list(range(n))
    for f, info, red in zip(feats, model.encoder.feature_info, reds[1:]):
        assert f.shape == (2, info["num_chs"]) + _ceil(size, red)
    for i in range(n):
        (deeper, skip), y = calls[i]
        assert y.shape == (2, dec.channels[i]) + _ceil(size, reds[i]), i
        assert deeper is (feats[-1] if i == n - 1 else calls[i + 1][1]), f"stage {i} does not take the deeper stage"
        if i > 0:
            assert skip is feats[i - 1], f"stage {i} does not take encoder map {i - 1} as its skip"
        else:
            assert skip.shape == (2, dec.channels[0]) + size
            torch.testing.assert_close(skip, dec.input_skip(x))
    torch.testing.assert_close(out, dec.head(calls[0][1]))


def _center_tap(conv, *scales):
    """A 3x3x3 conv that multiplies input channel c by scales[c] (one output channel, no bias)."""
    with torch.no_grad():
        conv.weight.zero_()
        for c, s in enumerate(scales):
            conv.weight[0, c, 1, 1, 1] = s
        conv.bias.zero_()


def test_unet_decoder_known_answer():
    """With 1-channel maps, no norm, nearest-neighbour transposed convs and centre-tap convs, every stage computes
    up(deeper) + c * skip (positive values pass LeakyReLU unchanged), so the logits are a sum written here:
    out[q] = f2[q // r2] + c1 f1[q // r1] + c0 f0[q // r0] + c_in x[q], on an odd input size (crops at the far end)."""
    reds = [(2, 2, 1), (4, 4, 2), (8, 8, 4)]
    info = [{"num_chs": 1, "reduction": r} for r in reds]
    dec = UNetDecoder(info, in_chans=1, num_classes=1, channels=[1, 1, 1], norm="none").eval()
    coef = {"x": 2.0, 0: 3.0, 1: 5.0}  # stage 0's skip is the raw input, stage i's is encoder map i - 1
    _center_tap(dec.input_skip[0], 1.0)
    for i, stage in enumerate(dec.stages):
        with torch.no_grad():
            stage.up.weight.fill_(1.0)  # kernel == stride: nearest-neighbour upsampling
            stage.up.bias.zero_()
        _center_tap(stage.convs[0][0], 1.0, coef["x" if i == 0 else i - 1])  # cat order: [upsampled, skip]
        _center_tap(stage.convs[1][0], 1.0)
    with torch.no_grad():
        dec.head.weight.fill_(1.0)
        dec.head.bias.zero_()

    size = (20, 12, 7)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, *size, generator=g) + 0.5
    feats = [torch.rand(2, 1, *_ceil(size, r), generator=g) + 0.5 for r in reds]

    def at_full_res(f, r):  # f[q // r] on every axis
        idx = [torch.arange(s) // ri for s, ri in zip(size, r)]
        return f[:, :, idx[0]][:, :, :, idx[1]][:, :, :, :, idx[2]]

    expected = (at_full_res(feats[2], reds[2]) + coef[1] * at_full_res(feats[1], reds[1])
                + coef[0] * at_full_res(feats[0], reds[0]) + coef["x"] * x)
    with torch.no_grad():
        out = dec(feats, x)
    assert out.shape == (2, 1) + size
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def _sphere(n=32, seed=0):
    c = torch.arange(n, dtype=torch.float32)
    i, j, k = torch.meshgrid(c, c, c, indexing="ij")
    label = ((i - 13) ** 2 + (j - 18) ** 2 + (k - 15) ** 2 <= 8**2).long()
    image = label.float() + 0.3 * torch.randn(n, n, n, generator=torch.Generator().manual_seed(seed))
    return image[None, None], label[None, None]


@pytest.mark.parametrize("spec, lr, kw", [(RESNET, 3e-3, {}), (VIT, 1e-3, dict(feature_size=8))])
def test_overfits_a_bright_sphere(spec, lr, kw):
    from monai.losses import DiceCELoss

    model = _model(spec, **kw).train()
    image, label = _sphere()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    for _ in range(40):
        opt.zero_grad()
        loss_fn(model(image), label).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(image).argmax(1, keepdim=True)
    dice = 2 * (pred * label).sum() / (pred.sum() + label.sum())
    assert dice > 0.8, float(dice)

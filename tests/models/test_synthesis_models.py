"""Synthesis models: generator shapes, identity at init, conditioning and stem widening from a
1-channel checkpoint, the 3D PatchGAN's output size and receptive field (closed form and impulse
response), the adversarial losses against their formulas, the frozen perceptual loss against
torch's instance_norm, and a tiny overfit of an intensity mapping."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from volfm import VolfmError
from volfm.losses.image import PerceptualLoss3d, adversarial_loss
from volfm.models import create_encoder, save_encoder
from volfm.models.decoders import UNetDecoder, UNETRDecoder
from volfm.models.synthesis import PatchDiscriminator3d, SynthesisGenerator, adapt_input_channels

RESNET = ("resnet18_3d", dict(base_channels=8))
VIT = ("vit_tiny_3d", dict(img_size=32, patch_size=16))
VIT_ANISO = ("vit_tiny_3d", dict(img_size=(32, 32, 16), patch_size=(16, 16, 8)))


@pytest.fixture(autouse=True)
def _one_thread():
    # On a shared 2-core machine OpenMP's spinning threads make these small convs ~10x slower.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _gen(spec, seed=0, **kw):
    torch.manual_seed(seed)
    name, enc_kw = spec
    return SynthesisGenerator(name, encoder_kwargs=enc_kw, **kw)


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------- generator


@pytest.mark.parametrize("size", [(32, 32, 32), (33, 17, 9), (40, 36, 20)])
def test_resnet_generator_output_has_the_input_size(size):
    gen = _gen(RESNET, out_chans=2, in_chans_source=1).eval()
    assert isinstance(gen.decoder, UNetDecoder) and not gen.residual  # 2 outputs from 1 source: plain output
    with torch.no_grad():
        out = gen(_x(2, 1, *size))
    assert out.shape == (2, 2) + size and torch.isfinite(out).all()


@pytest.mark.parametrize("spec, size", [(VIT, (32, 32, 32)), (VIT, (48, 32, 64)), (VIT_ANISO, (48, 32, 16))])
def test_vit_generator_output_has_the_input_size(spec, size):
    gen = _gen(spec, out_chans=1).eval()
    assert isinstance(gen.decoder, UNETRDecoder) and gen.residual
    with torch.no_grad():
        out = gen(_x(1, 1, *size))
    assert out.shape == (1, 1) + size


@pytest.mark.parametrize("spec", [RESNET, VIT], ids=["resnet", "vit"])
def test_residual_generator_is_the_identity_at_init(spec):
    gen = _gen(spec, cond_chans=1)
    assert gen.residual
    src, cond = _x(2, 1, 32, 32, 32, seed=1), _x(2, 1, 32, 32, 32, seed=2)
    assert torch.equal(gen(src, cond), src)  # training mode: still exactly the source
    with torch.no_grad():
        assert torch.equal(gen.eval()(src, cond), src)
    # relu keeps a non-negative source (PET) as it is; a plain generator is not the identity.
    pet = src.abs()
    relu = _gen(RESNET, final_activation="relu").eval()
    plain = _gen(RESNET, residual=False, final_activation="relu").eval()
    with torch.no_grad():
        assert torch.equal(relu(pet), pet)
        out = plain(pet)
    assert not torch.equal(out, pet) and (out >= 0).all()
    sig = _gen(RESNET, residual=False, final_activation="sigmoid").eval()
    with torch.no_grad():
        s = sig(src)
    assert ((s > 0) & (s < 1)).all()


def test_conditioning_channels_reach_the_output():
    gen = _gen(RESNET, cond_chans=2, residual=False).eval()
    assert gen.encoder.in_chans == 3 and gen.config["encoder_kwargs"]["in_chans"] == 3
    src = _x(1, 1, 32, 32, 16)
    c1, c2 = _x(1, 2, 32, 32, 16, seed=1), _x(1, 2, 32, 32, 16, seed=2)
    with torch.no_grad():
        assert not torch.allclose(gen(src, c1), gen(src, c2))
    with pytest.raises(VolfmError, match=r"call it as generator\(source, cond\)"):
        gen(src)
    with pytest.raises(VolfmError, match="cond has shape"):
        gen(src, c1[:, :1])
    with pytest.raises(VolfmError, match="expects a source"):
        gen(torch.cat([src, src], 1), c1)
    with pytest.raises(VolfmError, match="cond_chans=0"):
        _gen(RESNET).eval()(src, c1)


def test_encoder_in_chans_mismatch_is_a_clear_error():
    enc = create_encoder("resnet18_3d", base_channels=8, in_chans=1)
    with pytest.raises(VolfmError, match=r"takes 1 input channels.*1 \+ 1 = 2.*in_chans=2"):
        SynthesisGenerator(enc, cond_chans=1)
    with pytest.raises(VolfmError, match="takes 2 input channels"):
        SynthesisGenerator("resnet18_3d", encoder_kwargs=dict(base_channels=8, in_chans=2))
    with pytest.raises(VolfmError, match="encoder_kwargs go with a registry name"):
        SynthesisGenerator(enc, encoder_kwargs=dict(base_channels=8))
    with pytest.raises(VolfmError, match="final_activation"):
        SynthesisGenerator(enc, final_activation="softmax")
    with pytest.raises(VolfmError, match="deep supervision"):
        SynthesisGenerator(enc, deep_supervision=True)


def test_config_rebuilds_the_generator():
    gen = _gen(RESNET, cond_chans=1, final_activation="relu", channels=(8, 8, 8, 16, 32))
    again = SynthesisGenerator.from_config(gen.config)
    assert again.config == gen.config
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in gen.state_dict().items()}


# ---------------------------------------------------------------------------- pretrained stem


def _stem_key(name):
    return "conv1.weight" if name.startswith("resnet") else "patch_embed.weight"


@pytest.mark.parametrize("spec", [RESNET, VIT], ids=["resnet", "vit"])
def test_one_channel_checkpoint_is_widened_for_conditioning(tmp_path, spec):
    name, kw = spec
    torch.manual_seed(3)
    pre = create_encoder(name, in_chans=1, **kw)
    if name.startswith("resnet"):  # non-trivial BatchNorm statistics must travel too
        pre.bn1.running_mean.uniform_(-0.5, 0.5)
    path = save_encoder(pre, tmp_path / "enc.safetensors")
    gen = SynthesisGenerator.from_pretrained_encoder(path, cond_chans=2)
    enc = gen.encoder
    assert enc.in_chans == 3 and gen.config["encoder"] == name and gen.config["encoder_kwargs"]["in_chans"] == 3
    stem, pre_state = enc.state_dict(), pre.state_dict()
    key = _stem_key(name)
    assert torch.equal(stem[key][:, :1], pre_state[key])
    assert torch.count_nonzero(stem[key][:, 1:]) == 0
    assert all(torch.equal(stem[k], v) for k, v in pre_state.items() if k != key)
    # At the start the widened encoder sees only the source, exactly as the pretrained one.
    src, cond = _x(1, 1, 32, 32, 32, seed=4), _x(1, 2, 32, 32, 32, seed=5)
    with torch.no_grad():
        a = enc.eval().forward_intermediates(torch.cat([src, cond], 1))
        b = pre.eval().forward_intermediates(src)
    assert all(torch.allclose(u, v, atol=1e-5) for u, v in zip(a, b))


def test_pretrained_from_a_task_checkpoint_and_errors(tmp_path):
    torch.manual_seed(0)
    pre = create_encoder("resnet18_3d", base_channels=8)
    ckpt = tmp_path / "task.ckpt"
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in pre.state_dict().items()},
                "volfm": {"encoder": {"name": "resnet18_3d", "kwargs": {"base_channels": 8}}}}, ckpt)
    gen = SynthesisGenerator.from_pretrained_encoder(ckpt, cond_chans=1, final_activation="relu")
    assert gen.encoder.in_chans == 2 and gen.final_activation == "relu"
    assert torch.equal(gen.encoder.conv1.weight[:, :1], pre.conv1.weight)
    same = SynthesisGenerator.from_pretrained_encoder(ckpt)  # no widening needed
    assert torch.equal(same.encoder.conv1.weight, pre.conv1.weight)

    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": {f"encoder.{k}": v for k, v in pre.state_dict().items()}}, bare)
    with pytest.raises(VolfmError, match="records no encoder name"):
        SynthesisGenerator.from_pretrained_encoder(bare)
    gen = SynthesisGenerator.from_pretrained_encoder(bare, "resnet18_3d", encoder_kwargs=dict(base_channels=8),
                                                     cond_chans=1)
    assert torch.equal(gen.encoder.conv1.weight[:, :1], pre.conv1.weight)

    two = save_encoder(create_encoder("resnet18_3d", base_channels=8, in_chans=2), tmp_path / "two.safetensors")
    with pytest.raises(VolfmError, match="2-channel encoder but the generator feeds 1"):
        SynthesisGenerator.from_pretrained_encoder(two)
    other = create_encoder("resnet18_3d", base_channels=16, in_chans=2)
    with pytest.raises(VolfmError, match="only a stem with fewer input channels"):
        adapt_input_channels(pre.state_dict(), other)


# ------------------------------------------------------------------------------- discriminator


@pytest.mark.parametrize("n_layers", [1, 2, 3, 4])
def test_discriminator_receptive_field_closed_form(n_layers):
    # Two stride-1 k4 convs see 7 voxels; each stride-2 k4 conv below maps r -> 2 (r - 1) + 4.
    disc = PatchDiscriminator3d(2, base_channels=4, n_layers=n_layers)
    assert disc.receptive_field() == (9 * 2**n_layers - 2,) * 3
    assert PatchDiscriminator3d(2, n_layers=3).receptive_field() == (70, 70, 70)  # pix2pix's 70x70 PatchGAN


@pytest.mark.parametrize("n_layers, size", [(2, 64), (3, 80)])
def test_discriminator_receptive_field_impulse_response(n_layers, size):
    # Gradient of one central logit w.r.t. the input is non-zero exactly on its receptive field
    # (positive weights and inputs, so nothing cancels; no norm, which would couple all voxels).
    torch.manual_seed(0)
    disc = PatchDiscriminator3d(1, base_channels=2, n_layers=n_layers, norm="none")
    with torch.no_grad():
        for p in disc.parameters():
            p.uniform_(0.1, 1.0)
    x = torch.rand(1, 1, size, size, size, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    logits = disc(x)
    c = [s // 2 for s in logits.shape[2:]]
    logits[0, 0, c[0], c[1], c[2]].backward()
    nz = (x.grad[0, 0] != 0).nonzero()
    extent = tuple(int(nz[:, a].max() - nz[:, a].min()) + 1 for a in range(3))
    assert nz[:, 0].min() > 0 and nz[:, 0].max() < size - 1  # the field lies inside the volume
    assert extent == disc.receptive_field()


def test_discriminator_output_shape_conditional_input_and_options():
    disc = PatchDiscriminator3d(2, base_channels=4)
    src, tgt = _x(2, 1, 32, 48, 24), _x(2, 1, 32, 48, 24, seed=1)
    out = disc(src, tgt)
    assert out.shape == (2, 1, 2, 4, 1) == (2, 1) + disc.output_size((32, 48, 24))
    assert out.shape[2:] == tuple(n // 8 - 2 for n in (32, 48, 24))
    assert torch.equal(disc(torch.cat([src, tgt], 1)), out)
    with pytest.raises(VolfmError, match="concatenated on channels"):
        disc(src)
    with pytest.raises(VolfmError, match="too small"):
        disc(src[..., :16], tgt[..., :16])

    sn = PatchDiscriminator3d(2, base_channels=4, n_layers=2, norm="none", spectral_norm=True)
    convs = [m for m in sn.modules() if isinstance(m, nn.Conv3d)]
    assert len(convs) == 4 and all(nn.utils.parametrize.is_parametrized(m, "weight") for m in convs)
    assert torch.isfinite(sn(src, tgt)).all()
    bn = PatchDiscriminator3d(2, base_channels=4, norm="batch")
    assert any(isinstance(m, nn.BatchNorm3d) for m in bn.modules())


# --------------------------------------------------------------------------------------- losses


def test_adversarial_losses_match_their_formulas():
    z = _x(2, 1, 3, 3, 3)
    assert torch.allclose(adversarial_loss(z, True), ((z - 1) ** 2).mean())
    assert torch.allclose(adversarial_loss(z, False, "lsgan"), (z**2).mean())
    p = torch.sigmoid(z.double())
    assert torch.allclose(adversarial_loss(z, True, "bce").double(), -torch.log(p).mean(), atol=1e-6)
    assert torch.allclose(adversarial_loss(z, False, "bce").double(), -torch.log(1 - p).mean(), atol=1e-6)
    assert torch.allclose(adversarial_loss(z, True, "hinge"), torch.clamp(1 - z, min=0).mean())
    assert torch.allclose(adversarial_loss(z, False, "hinge"), torch.clamp(1 + z, min=0).mean())
    assert torch.allclose(adversarial_loss(z, True, "hinge", for_discriminator=False), -z.mean())
    # Generator losses other than hinge are the discriminator's "real" loss on fakes.
    assert torch.equal(adversarial_loss(z, True, "lsgan", for_discriminator=False), adversarial_loss(z, True))
    with pytest.raises(VolfmError, match="real=True"):
        adversarial_loss(z, False, "hinge", for_discriminator=False)
    with pytest.raises(VolfmError, match="lsgan, hinge, bce"):
        adversarial_loss(z, True, "wgan")


def _perceptual(**kw):
    torch.manual_seed(0)
    enc = create_encoder("resnet18_3d", base_channels=8)
    with torch.no_grad():  # non-trivial running statistics, to see that eval mode uses them
        for m in enc.modules():
            if isinstance(m, nn.BatchNorm3d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return enc, PerceptualLoss3d(enc, **kw)


def test_perceptual_loss_matches_instance_norm_reference():
    enc, loss_fn = _perceptual(layers=(0, 2, -1), weights=(1.0, 0.5, 2.0))
    assert loss_fn.layers == (0, 2, 4)
    a, b = _x(1, 1, 32, 32, 32), _x(1, 1, 32, 32, 32, seed=1)
    assert loss_fn(a, a.clone()).item() == 0.0
    loss = loss_fn(a, b)
    with torch.no_grad():
        fa, fb = enc.eval().forward_intermediates(a), enc.forward_intermediates(b)
    ref = sum(w * F.l1_loss(F.instance_norm(fa[i]), F.instance_norm(fb[i])) for w, i in zip((1.0, 0.5, 2.0), (0, 2, 4)))
    assert loss.item() > 0
    assert torch.allclose(loss, ref, rtol=1e-4)
    with pytest.raises(VolfmError, match="out of range"):
        PerceptualLoss3d(enc, layers=(5,))
    with pytest.raises(VolfmError, match="2 weights for 3 layers"):
        PerceptualLoss3d(enc, weights=(1.0, 1.0))


def test_perceptual_loss_is_frozen_and_grads_reach_the_prediction_only():
    enc, loss_fn = _perceptual()
    assert enc.training and all(p.requires_grad for p in enc.parameters())  # the caller's encoder is untouched
    loss_fn.train()
    assert loss_fn.training and not any(m.training for m in loss_fn.encoder.modules())
    assert not any(p.requires_grad for p in loss_fn.encoder.parameters())
    stats = {k: v.clone() for k, v in loss_fn.encoder.state_dict().items()}
    pred = _x(1, 1, 32, 32, 32).requires_grad_(True)
    target = _x(1, 1, 32, 32, 32, seed=1).requires_grad_(True)
    loss_fn(pred, target).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert target.grad is None
    assert all(p.grad is None for p in loss_fn.encoder.parameters())
    assert all(torch.equal(v, stats[k]) for k, v in loss_fn.encoder.state_dict().items())  # no BN updates
    # Inside a bigger module, .train() on the parent still leaves the encoder in eval mode.
    parent = nn.ModuleDict({"perceptual": loss_fn}).train()
    assert not loss_fn.encoder.training and parent.training


# ------------------------------------------------------------------------------------- overfit


def test_generator_overfits_an_intensity_mapping():
    torch.manual_seed(0)
    n = 32
    ax = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
    i, j, k = torch.meshgrid(ax, ax, ax, indexing="ij")
    sphere = (i**2 + j**2 + k**2).sqrt() < 10
    texture = F.avg_pool3d(torch.rand(1, 1, n, n, n, generator=torch.Generator().manual_seed(0)), 3, 1, 1)
    source = 0.2 + 0.6 * sphere.float() + 0.2 * texture
    target = torch.where(sphere, 2 * source + 0.5, source)
    gen = SynthesisGenerator("resnet18_3d", encoder_kwargs=dict(base_channels=8))
    opt = torch.optim.Adam(gen.parameters(), lr=5e-3)
    first = None
    for _ in range(60):
        loss = (gen(source) - target).abs().mean()
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = (gen.eval()(source) - target).abs().mean().item()
    assert final < 0.1 * first, (first, final)

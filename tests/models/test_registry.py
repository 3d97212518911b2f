"""Every registered encoder is tested the moment it is registered (timm-style)."""
import copy

import pytest
import torch

from volfm import VolfmError
from volfm.models import create_encoder, list_encoders, load_encoder, register_encoder, save_encoder
from volfm.models.weights import read_encoder_metadata

ENCODERS = list_encoders()
SHAPE = (2, 1, 32, 32, 16)
_CACHE = {}


@pytest.fixture(scope="module", autouse=True)
def _free_cached_models():
    yield
    _CACHE.clear()  # ~1.4 GB of weights for all ResNets; do not hold it for the rest of the suite


def _input(seed=0):
    return torch.randn(*SHAPE, generator=torch.Generator().manual_seed(seed))


def _build(name):
    """A fresh copy of one seeded instance per encoder (building the big ones costs seconds)."""
    if name not in _CACHE:
        torch.manual_seed(0)
        _CACHE[name] = create_encoder(name, in_chans=1)
    return copy.deepcopy(_CACHE[name])


def test_registry_lists_the_resnets():
    assert {f"resnet{d}_3d" for d in (18, 34, 50, 101, 152)} <= set(ENCODERS)


def test_unknown_name_suggests_close_names():
    with pytest.raises(VolfmError, match=r"Did you mean 'resnet50_3d'.*Registered encoders: .*resnet18_3d"):
        create_encoder("resnet50-3d")


def test_registering_a_name_twice_is_refused():
    with pytest.raises(VolfmError, match="twice"):
        register_encoder("resnet18_3d")(lambda **kw: None)


@pytest.mark.parametrize("name", ENCODERS)
def test_output_shapes(name):
    model = _build(name).eval()
    x = _input()
    with torch.no_grad():
        feats = model.forward_features(x)
        inter = model.forward_intermediates(x)
        pooled = model.forward_pooled(x)
    assert feats.ndim == 5 and feats.shape[:2] == (2, model.num_features)
    assert len(inter) == len(model.feature_info)
    for f, info in zip(inter, model.feature_info):
        assert f.shape[1] == info["num_chs"]
        assert tuple(f.shape[2:]) == tuple(-(-s // r) for s, r in zip(SHAPE[2:], info["reduction"]))
    torch.testing.assert_close(inter[-1], feats)
    assert pooled.shape == (2, model.num_features)
    torch.testing.assert_close(pooled, feats.mean(dim=(2, 3, 4)))


@pytest.mark.parametrize("name", ENCODERS)
def test_safetensors_round_trip(name, tmp_path):
    model = _build(name).eval()
    with torch.no_grad():  # non-default BN statistics must survive the round trip too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.uniform_(-0.1, 0.1)
    path = save_encoder(model, tmp_path / f"{name}.safetensors")
    assert read_encoder_metadata(path)["volfm.encoder"] == name
    rebuilt = load_encoder(path).eval()
    assert type(rebuilt) is type(model) and rebuilt.encoder_name == name
    into = load_encoder(_build(name).eval(), path)
    x = _input(1)
    with torch.no_grad():
        ref = model.forward_pooled(x)
        assert torch.equal(rebuilt.forward_pooled(x), ref)
        assert torch.equal(into.forward_pooled(x), ref)


def test_loading_a_different_encoder_lists_the_keys(tmp_path):
    path = save_encoder(create_encoder("resnet50_3d"), tmp_path / "r50.safetensors")
    with pytest.raises(VolfmError) as err:
        load_encoder(create_encoder("resnet18_3d"), path)
    msg = str(err.value)
    assert "saved from 'resnet50_3d'" in msg and "'resnet18_3d'" in msg
    assert "shape-mismatched keys: " in msg
    assert "layer1.0.conv1.weight (checkpoint (64, 64, 1, 1, 1) vs model (64, 64, 3, 3, 3))" in msg
    assert "unexpected keys: " in msg and "layer1.0.conv3.weight" in msg


def test_checkpoint_without_metadata_needs_a_model(tmp_path):
    from safetensors.torch import save_file

    model = create_encoder("resnet18_3d")
    path = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(VolfmError, match="no volfm encoder name"):
        load_encoder(path)
    load_encoder(create_encoder("resnet18_3d"), path)  # works when the model is given


@pytest.mark.parametrize("name", ENCODERS)
def test_channels_last_3d_gives_the_same_output(name):
    model = _build(name).eval()
    x = _input()
    with torch.no_grad():
        ref = model.forward_features(x)
        model_cl = _build(name).eval().to(memory_format=torch.channels_last_3d)
        out = model_cl.forward_features(x.to(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out, ref, atol=1e-4 * max(ref.abs().max().item(), 1.0), rtol=1e-4)


@pytest.mark.parametrize("name", ENCODERS)
def test_backward_finite_and_grad_checkpointing_gives_the_same_gradients(name):
    plain = _build(name).train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    grads = []
    for model in (plain, ckpt):
        x = _input().requires_grad_(True)
        model.forward_pooled(x).square().mean().backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        grads.append([p.grad for p in model.parameters()])
    assert all(g is not None and torch.isfinite(g).all() for g in grads[0])
    for g_plain, g_ckpt in zip(*grads):
        torch.testing.assert_close(g_ckpt, g_plain, atol=1e-5 * max(g_plain.abs().max().item(), 1e-3), rtol=1e-4)


def _smallest_of_each_family():
    """One encoder per model class (the one with the fewest parameters): compile tests cost seconds each."""
    best = {}
    for name in ENCODERS:
        model = _build(name)
        n = sum(p.numel() for p in model.parameters())
        if type(model) not in best or n < best[type(model)][0]:
            best[type(model)] = (n, name)
    return sorted(name for _, name in best.values())


@pytest.mark.parametrize("name", _smallest_of_each_family())
def test_torch_compile_fullgraph_matches_eager(name):
    """The forward and backward trace into one graph (no graph breaks) and give the eager numbers."""
    model = _build(name).train()
    x = _input(2)
    eager = model.forward_pooled(x)
    eager.square().mean().backward()
    ref_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    compiled = torch.compile(model.forward_pooled, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    out.square().mean().backward()
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    for p, g in zip(model.parameters(), ref_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-5 * max(g.abs().max().item(), 1e-3), rtol=1e-4)

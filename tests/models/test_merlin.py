"""Merlin checkpoints -> volfm resnet*_3d: parity with a forward pass written from Merlin's layout (tests/merlin_fakes.py),
negative controls for the axis permute, strict key handling, and bad files."""
import argparse

import pytest
import torch

from volfm import VolfmError
from volfm.models import create_encoder
from volfm.models import merlin as M
from volfm.models.text import merlin_sanitize
from volfm.models.weights import load_encoder, load_state_dict_checked, save_encoder

PREFIX = "encode_image.i3_resnet."


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def fake50(merlin_fakes):
    return merlin_fakes.make_merlin_state(depth=50, classes=7, seed=0)


@pytest.fixture(scope="module")
def x_ct():
    # distinct I, J, K so that a wrong axis order cannot line up by accident
    return torch.randn(2, 1, 48, 40, 24, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.fixture(scope="module")
def ref50(merlin_fakes, fake50, x_ct):
    return merlin_fakes.merlin_reference(fake50, x_ct)


def test_sanitize_matches_nltk_wordpunct():
    assert merlin_sanitize("Liver: Normal.  No focal lesion (2.5 cm)!") == \
        "liver : normal . no focal lesion ( 2 . 5 cm )!"
    assert merlin_sanitize("") == ""


def test_reference_itself_depends_on_every_tap(merlin_fakes, fake50, x_ct, ref50):
    """The fake's outer time taps are not zero (a centre-inflated fake could not tell T from H/W)."""
    state = dict(fake50)
    w = state[PREFIX + "layer2.0.conv2.weight"].clone()
    w[:, :, 0] = 0
    w[:, :, 2] = 0
    state[PREFIX + "layer2.0.conv2.weight"] = w
    assert rel(merlin_fakes.merlin_reference(state, x_ct)["pooled"], ref50["pooled"]) > 1e-2


def test_depth50_parity_every_stage(fake50, x_ct, ref50):
    w = M.convert_merlin_state(fake50, source="fake.pt")
    assert (w.layout, w.depth, w.encoder_name, w.num_classes) == ("merlin", 50, "resnet50_3d", 7)
    enc = w.build_encoder().double()
    with torch.no_grad():
        feats = enc.forward_intermediates(x_ct)
        pooled = enc.forward_pooled(x_ct)
    # Merlin's maps are (B, C, T, H, W) with T = K: volfm's are (B, C, I, J, K)
    assert rel(feats[0], ref50["stem"].permute(0, 1, 3, 4, 2)) < 1e-9
    for mine, theirs in zip(feats[1:], ref50["layers"]):
        assert mine.shape == theirs.permute(0, 1, 3, 4, 2).shape
        assert rel(mine, theirs.permute(0, 1, 3, 4, 2)) < 1e-9
    assert rel(pooled, ref50["pooled"]) < 1e-9
    logits = torch.nn.functional.linear(pooled, w.classifier["weight"], w.classifier["bias"])
    assert rel(logits, ref50["logits"]) < 1e-9
    proj = torch.nn.functional.linear(pooled, w.contrastive_head["weight"], w.contrastive_head["bias"])
    assert rel(proj, ref50["contrastive"]) < 1e-9


def _stem_right(wrong):
    """``wrong`` for every kernel but the stem's (the one kernel whose shape would give a wrong map away): what a
    converter that only special-cases the stem would do."""
    return lambda w: w.permute(0, 1, 3, 4, 2).contiguous() if w.shape[-1] == 7 else wrong(w)


@pytest.mark.parametrize("wrong", [
    lambda w: w.contiguous(),                                    # the permute skipped
    _stem_right(lambda w: w.contiguous()),                       # skipped for the 1x1x1 / 3x3x3 kernels: loads silently
    lambda w: w.permute(0, 1, 4, 3, 2).contiguous(),             # another axis order
    _stem_right(lambda w: w.permute(0, 1, 4, 3, 2).contiguous()),
    lambda w: w.permute(0, 1, 3, 4, 2).flip(-1).contiguous(),    # K reversed
], ids=["no-permute", "no-permute-but-stem", "wrong-order", "wrong-order-but-stem", "k-flip"])
def test_a_wrong_axis_map_is_caught(monkeypatch, fake50, x_ct, ref50, wrong):
    def patched(w):
        if w.ndim != 5:
            raise AssertionError
        return wrong(w)

    monkeypatch.setattr(M, "merlin_conv_to_volfm", patched)
    try:
        enc = M.convert_merlin_state(fake50).build_encoder().double()
    except VolfmError:  # the stem's shape no longer fits: caught at conversion
        assert wrong(torch.zeros(64, 1, 3, 7, 7)).shape != (64, 1, 7, 7, 3)
        return
    with torch.no_grad():
        assert rel(enc.forward_pooled(x_ct), ref50["pooled"]) > 1e-2


def test_other_geometry_is_not_merlins(fake50, x_ct, ref50):
    """The kwargs matter: time_kernel=1 cannot take the weights, pool_time_stride=1 computes something else."""
    w = M.convert_merlin_state(fake50)
    with pytest.raises(VolfmError, match="shape-mismatched"):
        load_state_dict_checked(create_encoder("resnet50_3d", time_kernel=1), w.encoder, source="x")
    enc = create_encoder("resnet50_3d", pool_time_stride=1).double().eval()
    enc.load_state_dict(w.encoder)
    with torch.no_grad():
        assert rel(enc.forward_pooled(x_ct), ref50["pooled"]) > 1e-3


def test_depth152_parity_and_key_count(merlin_fakes):
    state = merlin_fakes.make_merlin_state(depth=152, classes=1692, seed=3, dtype=torch.float32)
    assert sum(k.startswith(PREFIX) for k in state) == 934  # 930 encoder tensors + 2 heads x 2
    w = M.convert_merlin_state(state)
    assert (w.depth, len(w.encoder), w.num_classes) == (152, 930, 1692)
    x = torch.randn(1, 1, 32, 32, 16, generator=torch.Generator().manual_seed(2))
    enc = w.build_encoder().double()
    s64 = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    with torch.no_grad():
        # float32 weights: the summed stem differs from Merlin's 3 copies by float32 rounding only
        assert rel(enc.forward_pooled(x.double()), merlin_fakes.merlin_reference(s64, x.double())["pooled"]) < 1e-6


def test_bare_five_year_layout(merlin_fakes, x_ct):
    state = merlin_fakes.make_merlin_state(depth=50, classes=6, seed=5, prefix="")
    w = M.convert_merlin_state(state)
    assert (w.layout, w.num_classes, bool(w.contrastive_head), w.logit_scale) == ("bare", 6, True, None)
    ref = merlin_fakes.merlin_reference(state, x_ct, prefix="")
    with torch.no_grad():
        pooled = w.build_encoder().double().forward_pooled(x_ct)
    assert rel(torch.nn.functional.linear(pooled, w.classifier["weight"], w.classifier["bias"]), ref["logits"]) < 1e-9


def test_missing_and_unknown_keys_name_the_key(fake50):
    state = dict(fake50)
    del state[PREFIX + "layer3.2.bn2.running_var"]
    with pytest.raises(VolfmError, match=r"'encode_image\.i3_resnet\.layer3\.2\.bn2\.running_var' is missing"):
        M.convert_merlin_state(state)
    state = dict(fake50)
    state[PREFIX + "fc.weight"] = torch.zeros(3, 2048)
    with pytest.raises(VolfmError, match=r"unknown Merlin image key 'encode_image\.i3_resnet\.fc\.weight'"):
        M.convert_merlin_state(state)
    state = dict(fake50)
    state["encode_text.extra_head.weight"] = torch.zeros(3)
    with pytest.raises(VolfmError, match="unknown Merlin key 'encode_text.extra_head.weight'"):
        M.convert_merlin_state(state)
    state = dict(fake50)
    state[PREFIX + "layer1.0.conv2.weight"] = torch.zeros(64, 64, 3, 3)
    with pytest.raises(VolfmError, match="layer1.0.conv2.weight"):
        M.convert_merlin_state(state)
    with pytest.raises(VolfmError, match="not a Merlin checkpoint"):
        M.convert_merlin_state({"encoder.conv1.weight": torch.zeros(1)}, source="other.pt")
    state = {k: v for k, v in fake50.items() if ".layer4.2." not in k}
    with pytest.raises(VolfmError, match=r"\[3, 4, 6, 2\] blocks per stage"):
        M.convert_merlin_state(state)


def test_missing_num_batches_tracked_is_filled(fake50):
    state = {k: v for k, v in fake50.items() if not k.endswith("num_batches_tracked")}
    w = M.convert_merlin_state(state)
    assert w.notes and "num_batches_tracked" in w.notes[0]
    assert int(w.encoder["bn1.num_batches_tracked"]) == 0


def test_files_module_prefix_and_roundtrip(tmp_path, fake50, x_ct, ref50):
    path = tmp_path / "merlin.pt"
    torch.save({"module." + k: v for k, v in fake50.items()}, path)
    enc = M.merlin_encoder(path)
    out = save_encoder(enc, tmp_path / "encoder.safetensors")
    again = load_encoder(out).eval()  # a float32 model: the float64 fake is rounded on loading
    assert again.encoder_name == "resnet50_3d" and again.encoder_kwargs == M.MERLIN_ENCODER_KWARGS
    with torch.no_grad():
        assert rel(again.double().forward_pooled(x_ct), ref50["pooled"]) < 1e-5


def test_bad_files_give_one_line_errors(tmp_path):
    with pytest.raises(VolfmError, match="does not exist"):
        M.read_merlin_state(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(VolfmError, match=r"junk\.pt.*weights_only=True"):
        M.read_merlin_state(tmp_path / "junk.pt")
    # a pickle that needs code to run (here argparse.Namespace): refused by weights_only=True
    torch.save({"args": argparse.Namespace(lr=1.0), "state_dict": {}}, tmp_path / "code.pt")
    with pytest.raises(VolfmError, match=r"code\.pt.*weights_only=True"):
        M.read_merlin_state(tmp_path / "code.pt")
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(VolfmError, match="expected a state dict"):
        M.read_merlin_state(tmp_path / "list.pt")
    torch.save({"a": 1}, tmp_path / "plain.pt")
    with pytest.raises(VolfmError, match="'a' is not a named tensor"):
        M.read_merlin_state(tmp_path / "plain.pt")

"""I3D inflation of a 2D ResNet: checked against a 2D ResNet-18 written here with torchvision's
module names (no torchvision needed), randomly initialised, BatchNorm with random statistics."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from volfm import VolfmError
from volfm.models import ResNet3d, create_encoder, inflate_resnet2d_state_dict, resnet3d_from_2d


class BasicBlock2d(nn.Module):
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18_2d(nn.Module):
    """torchvision's resnet18 layout and parameter names."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        chans = [64, 64, 128, 256, 512]
        for i in range(4):
            stride = 1 if i == 0 else 2
            layer = nn.Sequential(BasicBlock2d(chans[i], chans[i + 1], stride), BasicBlock2d(chans[i + 1], chans[i + 1]))
            setattr(self, f"layer{i + 1}", layer)
        self.fc = nn.Linear(512, 1000)

    def intermediates(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        feats = [x]
        x = self.maxpool(x)
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            feats.append(x)
        return feats


@pytest.fixture(scope="module")
def resnet18_2d():
    torch.manual_seed(0)
    net = ResNet18_2d()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):  # non-trivial eval-mode BatchNorm
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


# Along K, every op of ResNet-18 on its longest path (all kernels are symmetric with padding
# (k-1)/2, so other paths' receptive fields are nested in it): (kernel, stride, padding) per stage.
_K_OPS_PER_STAGE = [
    [(3, 1, 1)],  # stem conv
    [(3, 2, 1)] + [(3, 1, 1)] * 4,  # maxpool + layer1
    [(3, 2, 1)] + [(3, 1, 1)] * 3,  # layer2
    [(3, 2, 1)] + [(3, 1, 1)] * 3,  # layer3
    [(3, 2, 1)] + [(3, 1, 1)] * 3,  # layer4
]


def _padding_free_positions(stage: int, n_in: int, n_out: int) -> list[int]:
    """Output K positions of `stage` whose receptive field lies inside [0, n_in): no zero/-inf padding."""
    ops = [op for s in _K_OPS_PER_STAGE[: stage + 1] for op in s]
    keep = []
    for t in range(n_out):
        a, b = t, t
        for k, s, p in reversed(ops):
            a, b = a * s - p, b * s - p + k - 1
        if a >= 0 and b <= n_in - 1:
            keep.append(t)
    return keep


def _close(a, b, rel=1e-4):
    scale = max(b.abs().max().item(), 1.0)
    torch.testing.assert_close(a, b, atol=rel * scale, rtol=rel)


def _model(state, in_chans=1):
    model = create_encoder("resnet18_3d", in_chans=in_chans)
    model.load_state_dict(state)
    return model.eval()


def test_center_inflation_gives_2d_activations_at_every_slice(resnet18_2d):
    # Center inflation: every conv sees only its own slice, and max-pooling over equal slices is
    # the identity along K, so a volume constant along K reproduces the 2D activations exactly
    # at every K position, borders included.
    model = _model(inflate_resnet2d_state_dict(resnet18_2d.state_dict(), 18, mode="center"))
    img = torch.randn(1, 1, 64, 64)
    vol = img.unsqueeze(-1).expand(-1, -1, -1, -1, 8).contiguous()
    with torch.no_grad():
        ref = resnet18_2d.intermediates(img.expand(-1, 3, -1, -1))  # grey image as RGB (x, x, x)
        out = model.forward_intermediates(vol)
    for r, o in zip(ref, out):
        assert o.shape[:4] == r.shape
        for t in range(o.shape[-1]):
            _close(o[..., t], r)


def test_mean_inflation_gives_2d_activations_away_from_padding(resnet18_2d):
    # Mean inflation: the T taps sum to the 2D kernel, so a K-constant input reproduces the 2D
    # activations exactly where the K receptive field never reaches zero (conv) or -inf (pool)
    # padding. Those positions are computed analytically; the volume is long enough that even the
    # last stage (K receptive field 217 slices) has some, and the others must differ (sanity).
    model = _model(inflate_resnet2d_state_dict(resnet18_2d.state_dict(), 18, mode="mean"))
    n_k = 240
    img = torch.randn(1, 1, 32, 32)
    vol = img.unsqueeze(-1).expand(-1, -1, -1, -1, n_k).contiguous()
    with torch.no_grad():
        ref = resnet18_2d.intermediates(img.expand(-1, 3, -1, -1))
        out = model.forward_intermediates(vol)
    for stage, (r, o) in enumerate(zip(ref, out)):
        keep = _padding_free_positions(stage, n_k, o.shape[-1])
        assert keep, f"stage {stage}: no padding-free position"
        for t in keep:
            _close(o[..., t], r)
        border = o[..., 0]
        assert not torch.allclose(border, r, atol=1e-3), "border slice should feel the zero padding"


def test_inflated_weights_follow_the_definition(resnet18_2d):
    sd2 = resnet18_2d.state_dict()
    mean = inflate_resnet2d_state_dict(sd2, 18, mode="mean", in_chans=1)
    center = inflate_resnet2d_state_dict(sd2, 18, mode="center", in_chans=3)
    w = sd2["layer2.0.conv1.weight"]
    assert mean["layer2.0.conv1.weight"].shape == (*w.shape, 3)
    for t in range(3):
        torch.testing.assert_close(mean["layer2.0.conv1.weight"][..., t], w / 3)
    torch.testing.assert_close(center["layer2.0.conv1.weight"][..., 1], w)
    assert center["layer2.0.conv1.weight"][..., [0, 2]].abs().sum() == 0
    # 1x1 convs get a single tap; BN copied; stem RGB -> grey sums input channels; fc dropped.
    torch.testing.assert_close(mean["layer2.0.downsample.0.weight"], sd2["layer2.0.downsample.0.weight"].unsqueeze(-1))
    torch.testing.assert_close(mean["layer3.1.bn2.running_var"], sd2["layer3.1.bn2.running_var"])
    torch.testing.assert_close(mean["conv1.weight"].sum(-1), sd2["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(center["conv1.weight"][..., 1], sd2["conv1.weight"])
    assert not any(k.startswith("fc.") for k in mean)


def test_inflation_with_wrong_depth_names_the_keys(resnet18_2d):
    with pytest.raises(VolfmError, match=r"missing keys: .*conv3"):
        inflate_resnet2d_state_dict(resnet18_2d.state_dict(), 50)
    with pytest.raises(VolfmError, match="mode"):
        inflate_resnet2d_state_dict(resnet18_2d.state_dict(), 18, mode="edge")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_resnet3d_from_2d_file(resnet18_2d, tmp_path, suffix):
    path = tmp_path / f"r18{suffix}"
    state = {k: v.clone() for k, v in resnet18_2d.state_dict().items()}
    if suffix == ".pth":
        torch.save({"module." + k: v for k, v in state.items()}, path)  # DataParallel-style keys
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    model = resnet3d_from_2d(path, 18, mode="mean").eval()
    assert model.encoder_name == "resnet18_3d"
    ref = _model(inflate_resnet2d_state_dict(state, 18, mode="mean"))
    x = torch.randn(1, 1, 32, 32, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_pooled(x), ref.forward_pooled(x))
    with pytest.raises(VolfmError, match="do not exist"):
        resnet3d_from_2d(tmp_path / "nope.pth", 18)


# torchvision's 2D parameter counts without the fc layer; with time_kernel=1 and RGB input the 3D model must match.
@pytest.mark.parametrize(
    "depth,n_params", [(18, 11_176_512), (34, 21_284_672), (50, 23_508_032), (101, 42_500_160), (152, 58_143_808)]
)
def test_parameter_count_matches_torchvision(depth, n_params):
    model = ResNet3d(depth=depth, time_kernel=1, in_chans=3)
    assert sum(p.numel() for p in model.parameters()) == n_params


def test_resnet152_merlin_layout_shapes():
    model = create_encoder("resnet152_3d").eval()
    assert model.num_features == 2048
    assert model.conv1.kernel_size == (7, 7, 3) and model.conv1.stride == (2, 2, 1)  # Merlin's 3x7x7 / (1,2,2), K = time
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 1, 64, 64, 32))
    assert feats.shape == (1, 2048, 2, 2, 2)  # output stride (32, 32, 16): 224x224x160 -> 7x7x10


def test_bad_input_shape_is_explained():
    model = create_encoder("resnet18_3d", in_chans=1)
    with pytest.raises(VolfmError, match=r"\(B, 1, I, J, K\)"):
        model.forward_features(torch.randn(1, 2, 32, 32, 8))
    with pytest.raises(VolfmError, match="depth"):
        ResNet3d(depth=20)


def test_grad_checkpointing_updates_batchnorm_statistics_once():
    """The recomputation in the backward pass must not update running statistics a second time."""
    import copy

    torch.manual_seed(0)
    plain = create_encoder("resnet18_3d").train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 1, 32, 32, 16)
    for model in (plain, ckpt):
        model.forward_pooled(x).sum().backward()
    for (name, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)
    assert int(ckpt.layer4[1].bn2.num_batches_tracked) == 1
    assert ckpt.layer1[0].bn1.momentum == plain.layer1[0].bn1.momentum == 0.1  # restored after the recomputation


def test_pool_time_stride_one_keeps_twice_the_slices():
    model = create_encoder("resnet18_3d", pool_time_stride=1).eval()
    assert [f["reduction"] for f in model.feature_info][-1] == (32, 32, 8)
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 1, 64, 64, 32))
    assert feats.shape == (1, 512, 2, 2, 4)
    with pytest.raises(VolfmError, match="pool_time_stride"):
        ResNet3d(depth=18, pool_time_stride=3)


def test_base_channels_scales_every_stage():
    model = create_encoder("resnet18_3d", base_channels=16).eval()
    assert model.num_features == 128 and [f["num_chs"] for f in model.feature_info] == [16, 16, 32, 64, 128]
    with torch.no_grad():
        inter = model.forward_intermediates(torch.randn(1, 1, 32, 32, 16))
    assert [f.shape[1] for f in inter] == [16, 16, 32, 64, 128]
    # a quarter of the width: about 1/16 of the parameters of the full network
    full = sum(p.numel() for p in create_encoder("resnet18_3d").parameters())
    assert 1 / 20 < sum(p.numel() for p in model.parameters()) / full < 1 / 12

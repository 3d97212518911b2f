"""Re-estimating BatchNorm statistics of a frozen encoder: the exact batch-average (precise BN), checked against
statistics computed by hand with the dense ops; weights, momenta and train/eval modes untouched."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from volfm.models import create_encoder
from volfm.models.norm import batchnorm_layers, recompute_batchnorm_stats


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.BatchNorm3d(4), nn.ReLU(), nn.Dropout(0.5),
                         nn.Conv3d(4, 3, 3, padding=1), nn.BatchNorm3d(3))


def _reference(net, batches):
    """Per-layer average of per-batch channel means and unbiased variances, each layer normalised with its batch's
    own statistics (train-mode BatchNorm), dropout off."""
    conv1, bn1, conv2 = net[0], net[1], net[4]
    m1, v1, m2, v2 = [], [], [], []
    for x in batches:
        h = conv1(x)
        m1.append(h.mean(dim=(0, 2, 3, 4)))
        v1.append(h.transpose(0, 1).reshape(h.shape[1], -1).var(dim=1, unbiased=True))
        h = F.batch_norm(h, None, None, bn1.weight, bn1.bias, training=True, eps=bn1.eps)
        h = conv2(F.relu(h))
        m2.append(h.mean(dim=(0, 2, 3, 4)))
        v2.append(h.transpose(0, 1).reshape(h.shape[1], -1).var(dim=1, unbiased=True))
    avg = lambda t: torch.stack(t).mean(0)  # noqa: E731
    return avg(m1), avg(v1), avg(m2), avg(v2)


def test_statistics_are_the_average_over_batches():
    net = _net()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 1, 6, 6, 6, generator=g) * (i + 1) + i for i in range(3)]
    weights = {k: v.clone() for k, v in net.state_dict().items() if "running" not in k and "num_batches" not in k}
    net.eval()
    with torch.no_grad():
        ref = _reference(net, batches)
    bn1, bn2 = net[1], net[5]
    assert recompute_batchnorm_stats(net, [bn1, bn2], batches) == 3
    torch.testing.assert_close(bn1.running_mean, ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn1.running_var, ref[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn2.running_mean, ref[2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn2.running_var, ref[3], rtol=1e-5, atol=1e-6)
    assert int(bn1.num_batches_tracked) == 3
    for k, v in weights.items():  # weights untouched
        assert torch.equal(net.state_dict()[k], v)
    assert bn1.momentum == 0.1 and bn2.momentum == 0.1  # momenta back
    assert not any(m.training for m in net.modules())  # modes back (all were eval)


def test_only_the_given_layers_move_and_modes_are_restored():
    net = _net()
    net.train()
    net[5].eval()
    before = net[5].running_mean.clone()
    recompute_batchnorm_stats(net, [net[1]], [torch.randn(2, 1, 6, 6, 6)])
    assert torch.equal(net[5].running_mean, before)
    assert [m.training for m in net] == [True, True, True, True, True, False]


def test_no_batches_keeps_the_statistics():
    net = _net()
    net[1].running_mean.fill_(0.25)
    assert recompute_batchnorm_stats(net, [net[1]], []) == 0
    assert torch.equal(net[1].running_mean, torch.full((4,), 0.25)) and net[1].momentum == 0.1


@pytest.mark.parametrize("freeze", ["none", "all", "layer4"])
def test_batchnorm_layers_finds_the_frozen_ones(freeze):
    enc = create_encoder("resnet18_3d", in_chans=1, base_channels=8)
    every = batchnorm_layers(enc)
    assert every and all(isinstance(m, nn.BatchNorm3d) for m in every)
    if freeze == "all":
        enc.requires_grad_(False)
        expect = every
    elif freeze == "layer4":
        enc.requires_grad_(False)
        enc.layer4.requires_grad_(True)
        expect = [m for m in every if not any(m is n for n in enc.layer4.modules())]
    else:
        expect = []
    assert batchnorm_layers(enc, frozen_only=True) == expect
    assert batchnorm_layers(create_encoder("resnet18_3d", in_chans=1, base_channels=8, norm="group")) == []

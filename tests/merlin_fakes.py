"""A Merlin-layout state dict with random weights, and a forward pass written from Merlin's layout alone.

Neither uses volfm's ResNet: the reference follows Merlin's ``I3ResNet.forward`` (input permuted to (B, 1, Z, X, Y),
copied to 3 channels, kernels (out, in, kT, kH, kW), stem stride (1, 2, 2) padding (1, 3, 3), max-pool 3/2/1,
torchvision bottlenecks with the stride on conv2 and on the 1x1x1 downsample, average pool, 1x1x1 heads).
Every kernel tap is random: Merlin's own inflation puts the 2D kernel in the middle time tap, and zero outer taps
would hide a wrong axis order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

BLOCKS = {50: (3, 4, 6, 3), 152: (3, 8, 36, 3)}


def make_merlin_state(depth: int = 50, classes: int = 7, seed: int = 0, prefix: str = "encode_image.i3_resnet.",
                      dtype=torch.float64, text: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}

    def conv(name, o, i, k):
        fan_in = i * k[0] * k[1] * k[2]
        state[prefix + name] = torch.randn(o, i, *k, generator=g, dtype=dtype) * (2.0 / fan_in) ** 0.5

    def bn(name, c):
        state[prefix + name + ".weight"] = 0.5 + torch.rand(c, generator=g, dtype=dtype)
        state[prefix + name + ".bias"] = 0.2 * torch.randn(c, generator=g, dtype=dtype)
        state[prefix + name + ".running_mean"] = 0.1 * torch.randn(c, generator=g, dtype=dtype)
        state[prefix + name + ".running_var"] = 0.5 + torch.rand(c, generator=g, dtype=dtype)
        state[prefix + name + ".num_batches_tracked"] = torch.tensor(1000, dtype=torch.long)

    conv("conv1.weight", 64, 3, (3, 7, 7))
    bn("bn1", 64)
    inplanes = 64
    for li, (n, planes) in enumerate(zip(BLOCKS[depth], (64, 128, 256, 512)), start=1):
        for m in range(n):
            b = f"layer{li}.{m}."
            conv(b + "conv1.weight", planes, inplanes, (1, 1, 1))
            bn(b + "bn1", planes)
            conv(b + "conv2.weight", planes, planes, (3, 3, 3))
            bn(b + "bn2", planes)
            conv(b + "conv3.weight", planes * 4, planes, (1, 1, 1))
            bn(b + "bn3", planes * 4)
            if m == 0:
                conv(b + "downsample.0.weight", planes * 4, inplanes, (1, 1, 1))
                bn(b + "downsample.1", planes * 4)
            inplanes = planes * 4
    state[prefix + "classifier.weight"] = 0.02 * torch.randn(classes, 2048, 1, 1, 1, generator=g, dtype=dtype)
    state[prefix + "classifier.bias"] = 0.1 * torch.randn(classes, generator=g, dtype=dtype)
    # I3ResNet(conv_class=True) always builds the contrastive head, the five-year checkpoint (bare keys) included
    state[prefix + "contrastive_head.weight"] = 0.02 * torch.randn(512, 2048, 1, 1, 1, generator=g, dtype=dtype)
    state[prefix + "contrastive_head.bias"] = 0.1 * torch.randn(512, generator=g, dtype=dtype)
    if prefix:  # the full MerlinArchitecture
        state["logit_scale"] = torch.tensor(1.0, dtype=dtype)
    if text:
        state["encode_text.linear_layer.weight"] = 0.02 * torch.randn(512, 768, generator=g, dtype=dtype)
        state["encode_text.linear_layer.bias"] = torch.zeros(512, dtype=dtype)
    return state


def merlin_reference(state: dict[str, torch.Tensor], x_ijk: torch.Tensor, prefix: str = "encode_image.i3_resnet."):
    """Merlin's I3ResNet forward on a volfm batch (B, 1, I, J, K): {"stem", "layers" (Merlin's (B, C, T, H, W)),
    "pooled", "logits", "contrastive"}."""

    def s(k):
        return state[prefix + k]

    def bn(x, n):
        return F.batch_norm(x, s(n + ".running_mean"), s(n + ".running_var"), s(n + ".weight"), s(n + ".bias"),
                            training=False, momentum=0.0, eps=1e-5)

    x = x_ijk.permute(0, 1, 4, 2, 3)           # Merlin: (B, 1, H, W, D) -> (B, 1, D, H, W)
    x = torch.cat((x, x, x), dim=1)
    x = F.relu(bn(F.conv3d(x, s("conv1.weight"), stride=(1, 2, 2), padding=(1, 3, 3)), "bn1"))
    stem = x
    x = F.max_pool3d(x, kernel_size=3, stride=2, padding=1)
    layers = []
    for li in range(1, 5):
        m = 0
        while prefix + f"layer{li}.{m}.conv1.weight" in state:
            b = f"layer{li}.{m}."
            stride = 2 if (li > 1 and m == 0) else 1
            out = F.relu(bn(F.conv3d(x, s(b + "conv1.weight")), b + "bn1"))
            out = F.relu(bn(F.conv3d(out, s(b + "conv2.weight"), stride=stride, padding=1), b + "bn2"))
            out = bn(F.conv3d(out, s(b + "conv3.weight")), b + "bn3")
            if prefix + b + "downsample.0.weight" in state:
                idn = bn(F.conv3d(x, s(b + "downsample.0.weight"), stride=stride), b + "downsample.1")
            else:
                idn = x
            x = F.relu(out + idn)
            m += 1
        layers.append(x)
    feat = F.adaptive_avg_pool3d(x, 1)          # (B, 2048, 1, 1, 1), Merlin's avgpool
    res = {"stem": stem, "layers": layers, "pooled": feat.flatten(1),
           "logits": F.conv3d(feat, s("classifier.weight"), s("classifier.bias")).flatten(1)}
    if prefix + "contrastive_head.weight" in state:
        res["contrastive"] = F.conv3d(feat, s("contrastive_head.weight"), s("contrastive_head.bias")).flatten(1)
    return res

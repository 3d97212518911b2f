"""I3D-inflated 3D ResNet: Merlin's image encoder.

Input ``x`` is ``(B, C, I, J, K)``: the batch of volfm arrays ``(C, I, J, K)``; Merlin's
preprocessed CT is ``(B, 1, 224, 224, 160)``. The K axis (the slice axis of RAS-ordered
stores) plays the role of I3D's *time* axis: a 2D kernel ``(kh, kw)`` is inflated to
``(kh, kw, T)`` acting on ``(I, J, K)``, i.e. each axial-ish slice is an "image" of the 2D
network and K is "time". Everything below is written in (I, J, K) order, so Merlin's
"3x7x7 stem, stride (1, 2, 2)" in (T, H, W) order is ``kernel (7, 7, 3), stride (2, 2, 1)`` here.

Layout (hassony2's I3ResNet, which Merlin's encoder uses): stem conv (7,7,T) stride (2,2,1),
max-pool (3,3,3) stride 2 on all axes (``pool_time_stride=2``, hassony2's default), then the
torchvision stages; a 3x3 conv becomes (3,3,T) with the block's stride on all three axes, 1x1 convs
stay (1,1,1). The output stride is therefore (32, 32, 16): 224x224x160 -> 7x7x10
(``pool_time_stride=1`` keeps twice the slices: (32, 32, 8), 7x7x20). Module names match torchvision's ResNet
(conv1, bn1, layer1..4, downsample.0/1), so 2D checkpoints inflate key by key.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from volfm import VolfmError
from volfm.models.registry import create_encoder, register_encoder
from volfm.models.weights import load_state_dict_checked

__all__ = [
    "BasicBlock3d",
    "Bottleneck3d",
    "ResNet3d",
    "RESNET_DEPTHS",
    "inflate_resnet2d_state_dict",
    "resnet3d_from_2d",
]


def _conv(in_ch: int, out_ch: int, k: int, stride: int, t: int) -> nn.Conv3d:
    """A (k, k, t) conv with 'same' padding on (I, J, K); t = 1 for 1x1 convs."""
    tk = t if k > 1 else 1
    return nn.Conv3d(in_ch, out_ch, kernel_size=(k, k, tk), stride=stride, padding=(k // 2, k // 2, tk // 2), bias=False)


NORMS = ("batch", "group", "instance")


def norm_layer(kind: str, channels: int) -> nn.Module:
    """The encoder's normalisation: "batch" (BatchNorm3d, as Merlin/torchvision; running statistics), "group"
    (GroupNorm, groups of >= 2 channels, at most 32 groups) or "instance" (GroupNorm with one channel per group,
    i.e. affine instance norm). Group and instance norm keep no statistics, so nothing changes between whole
    volumes in pretraining and patches in fine-tuning; the module keeps the name ``bn*`` either way."""
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.GroupNorm(channels, channels)
    if kind == "group":
        groups = 32
        while groups > 1 and (channels % groups or channels // groups < 2):
            groups //= 2
        return nn.GroupNorm(groups, channels)
    raise VolfmError(f"norm must be one of {', '.join(NORMS)}, got {kind!r}")


class BasicBlock3d(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, time_kernel: int = 3,
                 norm: str = "batch"):
        super().__init__()
        self.conv1 = _conv(inplanes, planes, 3, stride, time_kernel)
        self.bn1 = norm_layer(norm, planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv(planes, planes, 3, 1, time_kernel)
        self.bn2 = norm_layer(norm, planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck3d(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, time_kernel: int = 3,
                 norm: str = "batch"):
        super().__init__()
        self.conv1 = _conv(inplanes, planes, 1, 1, time_kernel)
        self.bn1 = norm_layer(norm, planes)
        self.conv2 = _conv(planes, planes, 3, stride, time_kernel)  # stride on the 3x3 (torchvision v1.5)
        self.bn2 = norm_layer(norm, planes)
        self.conv3 = _conv(planes, planes * 4, 1, 1, time_kernel)
        self.bn3 = norm_layer(norm, planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


@contextlib.contextmanager
def _frozen_bn_stats(module: nn.Module):
    """While active, BatchNorm layers of ``module`` normalise with batch statistics as usual but leave
    their running statistics alone (momentum 0, ``num_batches_tracked`` restored): used for the
    recomputation of a checkpointed block, whose forward already updated them once."""
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(bns, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


# depth -> (block, blocks per stage), as torchvision.
RESNET_DEPTHS: dict[int, tuple[type[nn.Module], tuple[int, int, int, int]]] = {
    18: (BasicBlock3d, (2, 2, 2, 2)),
    34: (BasicBlock3d, (3, 4, 6, 3)),
    50: (Bottleneck3d, (3, 4, 6, 3)),
    101: (Bottleneck3d, (3, 4, 23, 3)),
    152: (Bottleneck3d, (3, 8, 36, 3)),
}


class ResNet3d(nn.Module):
    """I3D ResNet backbone (no classifier) with volfm's encoder interface.

    Args:
        depth: 18, 34, 50, 101 or 152.
        in_chans: input channels (1 for CT).
        time_kernel: taps along K of the stem and of every 3x3 conv (3 as I3D/Merlin; 1 gives a
            slice-wise 2D network).
        pool_time_stride: stride of the stem max-pool along K (2 as hassony2's I3ResNet; 1 halves
            the K reduction of every later stage).
        base_channels: width of the stem and the first stage (64 as torchvision; stages double it).
            Smaller widths give the fast CPU encoders of the demo recipes; 2D inflation needs 64.
        norm: "batch" (default, Merlin's), "group" or "instance" (see :func:`norm_layer`); 2D inflation needs
            "batch".
        grad_checkpointing: recompute each residual block in the backward pass (saves activation
            memory on big volumes; only active in training mode with grad enabled). BatchNorm running
            statistics are updated once per step, not again during the recomputation.
    """

    def __init__(self, depth: int = 50, in_chans: int = 1, time_kernel: int = 3, grad_checkpointing: bool = False,
                 pool_time_stride: int = 2, base_channels: int = 64, norm: str = "batch"):
        super().__init__()
        if norm not in NORMS:
            raise VolfmError(f"ResNet3d norm must be one of {', '.join(NORMS)}, got {norm!r}")
        if depth not in RESNET_DEPTHS:
            raise VolfmError(f"ResNet3d depth {depth} is not supported; choose one of {sorted(RESNET_DEPTHS)}")
        if time_kernel < 1 or time_kernel % 2 == 0:
            raise VolfmError(f"time_kernel must be a positive odd number (got {time_kernel})")
        if base_channels < 1:
            raise VolfmError(f"base_channels must be positive (got {base_channels})")
        if pool_time_stride not in (1, 2):
            raise VolfmError(f"pool_time_stride must be 1 or 2 (got {pool_time_stride})")
        block, layers = RESNET_DEPTHS[depth]
        self.depth = depth
        self.in_chans = in_chans
        self.time_kernel = time_kernel
        self.grad_checkpointing = grad_checkpointing
        self.norm_kind = norm

        w = self.base_channels = int(base_channels)
        self.conv1 = nn.Conv3d(
            in_chans, w, kernel_size=(7, 7, time_kernel), stride=(2, 2, 1), padding=(3, 3, time_kernel // 2), bias=False
        )
        self.bn1 = norm_layer(norm, w)
        self.relu = nn.ReLU(inplace=True)
        self.pool_time_stride = pool_time_stride
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=(2, 2, pool_time_stride), padding=1)
        self.inplanes = w
        self.layer1 = self._make_layer(block, w, layers[0], 1)
        self.layer2 = self._make_layer(block, 2 * w, layers[1], 2)
        self.layer3 = self._make_layer(block, 4 * w, layers[2], 2)
        self.layer4 = self._make_layer(block, 8 * w, layers[3], 2)
        self.num_features = 8 * w * block.expansion
        # timm-style description of forward_intermediates' outputs; reduction is per (I, J, K) axis.
        pk = pool_time_stride
        self.feature_info = [
            {"module": "act1", "num_chs": w, "reduction": (2, 2, 1)},
            {"module": "layer1", "num_chs": w * block.expansion, "reduction": (4, 4, pk)},
            {"module": "layer2", "num_chs": 2 * w * block.expansion, "reduction": (8, 8, 2 * pk)},
            {"module": "layer3", "num_chs": 4 * w * block.expansion, "reduction": (16, 16, 4 * pk)},
            {"module": "layer4", "num_chs": 8 * w * block.expansion, "reduction": (32, 32, 8 * pk)},
        ]
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm3d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv3d(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride, bias=False),
                norm_layer(self.norm_kind, planes * block.expansion),
            )
        mods = [block(self.inplanes, planes, stride, downsample, time_kernel=self.time_kernel, norm=self.norm_kind)]
        self.inplanes = planes * block.expansion
        mods += [block(self.inplanes, planes, time_kernel=self.time_kernel, norm=self.norm_kind) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def _run_stage(self, stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            for blk in stage:
                x = checkpoint(blk, x, use_reentrant=False,
                               context_fn=lambda blk=blk: (contextlib.nullcontext(), _frozen_bn_stats(blk)))
            return x
        return stage(x)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_chans:
            raise VolfmError(
                f"ResNet3d expects input (B, {self.in_chans}, I, J, K), got shape {tuple(x.shape)}; "
                "add the batch/channel axes or build the encoder with a matching in_chans"
            )

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps after the stem (stride (2,2,1)) and after each of the 4 stages."""
        self._check_input(x)
        x = self.relu(self.bn1(self.conv1(x)))
        feats = [x]
        x = self.maxpool(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = self._run_stage(stage, x)
            feats.append(x)
        return feats

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, num_features, I/32, J/32, K/16) (rounded up)."""
        self._check_input(x)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = self._run_stage(stage, x)
        return x

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Global average pool over (I, J, K): (B, num_features)."""
        return F.adaptive_avg_pool3d(features, 1).flatten(1)

    def forward_pooled(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pooled(x)


def _factory(depth: int):
    def build(**kwargs) -> ResNet3d:
        return ResNet3d(depth=depth, **kwargs)

    build.__name__ = f"resnet{depth}_3d"
    build.__doc__ = f"I3D-inflated ResNet-{depth} (see volfm.models.resnet3d)."
    return build


for _depth in RESNET_DEPTHS:
    register_encoder(f"resnet{_depth}_3d")(_factory(_depth))


# ----------------------------------------------------------------------------- inflation


def _adapt_in_chans(w: torch.Tensor, in_chans: int) -> torch.Tensor:
    """Adapt a stem weight (out, C2d, kh, kw) to ``in_chans`` inputs.

    in_chans=1: sum over the input channels, so a grey image x gives what the 2D network gives
    for the RGB image (x, x, x) -- the natural meaning of an RGB network applied to CT.
    in_chans=C2d: unchanged. Otherwise (timm's convention): repeat the channels cyclically and
    scale by C2d / in_chans, so a constant input gives the same response.
    """
    c2d = w.shape[1]
    if in_chans == c2d:
        return w
    if in_chans == 1:
        return w.sum(dim=1, keepdim=True)
    reps = -(-in_chans // c2d)
    return w.repeat(1, reps, 1, 1)[:, :in_chans] * (c2d / in_chans)


def _inflate_conv(w: torch.Tensor, t: int, mode: str) -> torch.Tensor:
    """(out, in, kh, kw) -> (out, in, kh, kw, t): mean spreads w/t over t taps, center puts w in the middle tap."""
    if t == 1:
        return w.unsqueeze(-1).clone()
    if mode == "mean":
        return w.unsqueeze(-1).repeat(1, 1, 1, 1, t) / t
    out = w.new_zeros(*w.shape, t)
    out[..., t // 2] = w
    return out


def _load_2d_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise VolfmError(f"2D ResNet weights {path} do not exist; give a local .pth/.pt or .safetensors file")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise VolfmError(f"cannot read 2D ResNet weights {path} with torch.load(weights_only=True): {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise VolfmError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def inflate_resnet2d_state_dict(
    state_dict_2d: dict[str, torch.Tensor],
    depth: int,
    mode: str = "center",
    time_kernel: int = 3,
    in_chans: int = 1,
) -> dict[str, torch.Tensor]:
    """Turn a torchvision-style 2D ResNet state dict into a :class:`ResNet3d` state dict.

    Conv weights with a spatial kernel > 1 (stem, 3x3) get ``time_kernel`` taps along K:
    ``mode="mean"`` repeats the 2D kernel over the taps divided by ``time_kernel`` (a volume constant
    along K then gives the 2D activations wherever the receptive field stays inside the volume);
    ``mode="center"`` puts it in the middle tap, zeros elsewhere (each K position then sees only its
    own slice in every conv). 1x1 convs get one tap. BatchNorm tensors are copied. The stem is
    adapted to ``in_chans`` (see ``_adapt_in_chans``: RGB -> 1 channel by summing). The classifier
    (``fc.*``) is dropped; a ``module.`` prefix (DataParallel) is stripped.
    """
    if mode not in ("center", "mean"):
        raise VolfmError(f"inflation mode must be 'center' or 'mean', got {mode!r}")
    state = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict_2d.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        value = value.detach().to("cpu")
        if value.ndim == 4:
            w = value.float() if not value.is_floating_point() else value
            if key == "conv1.weight":
                w = _adapt_in_chans(w, in_chans)
            t = time_kernel if w.shape[-1] > 1 or w.shape[-2] > 1 else 1
            value = _inflate_conv(w, t, mode)
        out[key] = value.clone()
    target = ResNet3d(depth=depth, in_chans=in_chans, time_kernel=time_kernel)
    # Validate against the 3D model so a ResNet-50 file given as depth=18 fails clearly here.
    load_state_dict_checked(target, out, source=f"inflated 2D ResNet state dict (depth={depth})", strict=True)
    return out


def resnet3d_from_2d(
    path: str | Path,
    depth: int,
    mode: str = "center",
    *,
    in_chans: int = 1,
    time_kernel: int = 3,
    grad_checkpointing: bool = False,
) -> ResNet3d:
    """Build ``resnet{depth}_3d`` (through the registry) with weights inflated from a local 2D file."""
    state = inflate_resnet2d_state_dict(_load_2d_state_dict(path), depth, mode=mode, time_kernel=time_kernel, in_chans=in_chans)
    model = create_encoder(f"resnet{depth}_3d", in_chans=in_chans, time_kernel=time_kernel, grad_checkpointing=grad_checkpointing)
    return load_state_dict_checked(model, state, source=str(path), strict=True)

"""PatchEmbed3d kernels: torch reference vs nn.Conv3d, Triton (interpreter on CPU) vs the reference.

tests/conftest.py sets TRITON_INTERPRET=1 before volfm.kernels is imported, so the Triton kernels
run under the interpreter here; shapes are tiny because the interpreter is slow.
"""
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import volfm.kernels.patch_embed as pe
from volfm.kernels.patch_embed import patch_embed_torch, patch_embed_triton
from volfm.models.patch_embed import PatchEmbed3d

# (B, C, (D, H, W), patch, E): block sizes under the interpreter are 16, so K = C*pd*ph*pw,
# M = B*N and E that are not multiples of 16 exercise the masks.
CASES = [
    (2, 1, (8, 12, 16), (2, 4, 4), 8),  # M=96, K=32, E=8 < block
    (2, 2, (8, 12, 16), (4, 4, 4), 24),  # M=24, K=128, E=24
    (1, 3, (6, 10, 9), (3, 5, 3), 20),  # odd everything: M=12, K=135, E=20
]
IDS = ["C1-p244-E8", "C2-p444-E24", "odd-C3-p353-E20"]


def _triton_skip_reason() -> str | None:
    """Why the Triton tests cannot run here, from named conditions only; never by running a kernel.

    A kernel that raises or gives wrong numbers must fail these tests, not skip them.
    """
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not pe.triton_interpret_enabled():
        return "TRITON_INTERPRET=1 is not set (tests/conftest.py sets it), so triton cannot run on CPU"
    return None  # installed and interpreter on: HAS_TRITON / triton_usable must hold (tested below)


TRITON_SKIP = _triton_skip_reason()
TRITON_OK = TRITON_SKIP is None
needs_triton = pytest.mark.skipif(not TRITON_OK, reason=f"triton cannot run here: {TRITON_SKIP}")


@needs_triton
def test_triton_is_usable_when_installed_and_interpreted():
    """Installed + interpreter on, yet volfm cannot use triton (a broken import, volfm.kernels imported before
    TRITON_INTERPRET was set): a failure, not a reason to skip the kernel tests."""
    assert pe.HAS_TRITON, "the triton package is installed but volfm.kernels could not import it"
    assert pe.triton_usable("cpu"), "volfm.kernels was imported before TRITON_INTERPRET=1 was set"


def _make(case, seed=0, dtype=torch.float32, bias=True, pos=True):
    B, C, (D, H, W), patch, E = case
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, D, H, W, generator=g, dtype=dtype)
    w = torch.randn(E, C, *patch, generator=g, dtype=dtype) * 0.2
    b = torch.randn(E, generator=g, dtype=dtype) if bias else None
    N = (D // patch[0]) * (H // patch[1]) * (W // patch[2])
    p = torch.randn(N, E, generator=g, dtype=dtype) if pos else None
    return x, w, b, p, patch


def _conv_tokens(x, w, b, patch, p=None):
    out = F.conv3d(x, w, b, stride=patch).flatten(2).transpose(1, 2)
    return out if p is None else out + p


def _grads(fn, x, w, b, p, patch, grad_out):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, w, b, p)]
    out = fn(leaves[0], leaves[1], leaves[2], patch, leaves[3])
    live = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(out, live, grad_out)
    it = iter(grads)
    return out.detach(), [next(it) if t is not None else None for t in leaves]


# --------------------------------------------------------------------------- torch reference


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("bias", [True, False])
def test_torch_reference_matches_conv3d(case, bias):
    x, w, b, p, patch = _make(case, bias=bias)
    ref = _conv_tokens(x, w, b, patch, p)
    out = patch_embed_torch(x, w, b, patch, p)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    # flattened (E, K) weight in Conv3d order gives the same result
    torch.testing.assert_close(patch_embed_torch(x, w.flatten(1), b, patch, p), ref, atol=1e-5, rtol=1e-5)


def test_torch_reference_grads_match_conv3d():
    x, w, b, p, patch = _make(CASES[1])
    g = torch.randn(x.shape[0], p.shape[0], w.shape[0])
    _, ref = _grads(lambda x, w, b, patch, p: _conv_tokens(x, w, b, patch, p), x, w, b, p, patch, g)
    _, got = _grads(patch_embed_torch, x, w, b, p, patch, g)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)


def test_torch_reference_gradcheck_float64():
    x, w, b, p, patch = _make((1, 2, (2, 4, 4), (1, 2, 2), 3), dtype=torch.float64)
    inputs = tuple(t.requires_grad_(True) for t in (x, w, b, p))
    assert torch.autograd.gradcheck(
        lambda x, w, b, p: patch_embed_torch(x, w, b, patch, p), inputs, eps=1e-6, atol=1e-6
    )


def test_pos_embed_with_leading_batch_dim():
    x, w, b, p, patch = _make(CASES[0])
    torch.testing.assert_close(patch_embed_torch(x, w, b, patch, p[None]), patch_embed_torch(x, w, b, patch, p))


@pytest.mark.parametrize("fn", [patch_embed_torch, patch_embed_triton], ids=["torch", "triton"])
def test_errors(fn):
    if fn is patch_embed_triton and not TRITON_OK:
        pytest.skip(f"triton cannot run here: {TRITON_SKIP}")
    w = torch.randn(4, 1, 2, 2, 2)
    with pytest.raises(ValueError, match="not divisible"):
        fn(torch.randn(1, 1, 4, 5, 4), w, None, 2)
    with pytest.raises(ValueError, match="weight shape"):
        fn(torch.randn(1, 2, 4, 4, 4), w, None, 2)
    with pytest.raises(ValueError, match="pos_embed"):
        fn(torch.randn(1, 1, 4, 4, 4), w, None, 2, torch.randn(7, 4))


# --------------------------------------------------------------------------- triton kernels


@needs_triton
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("bias,pos", [(True, True), (False, False)], ids=["bias+pos", "plain"])
def test_triton_forward_and_grads_match_reference(case, bias, pos):
    x, w, b, p, patch = _make(case, seed=1, bias=bias, pos=pos)
    B, N, E = x.shape[0], (x[0, 0].numel() // (patch[0] * patch[1] * patch[2])), w.shape[0]
    g = torch.randn(B, N, E, generator=torch.Generator().manual_seed(2))
    ref_out, ref_grads = _grads(patch_embed_torch, x, w, b, p, patch, g)
    out, grads = _grads(patch_embed_triton, x, w, b, p, patch, g)
    assert out.shape == (B, N, E) and out.dtype == x.dtype
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, _conv_tokens(x, w, b, patch, p), atol=1e-5, rtol=1e-5)
    for name, got, ref in zip(("x", "weight", "bias", "pos"), grads, ref_grads):
        if ref is None:
            assert got is None
            continue
        assert got.shape == ref.shape and got.dtype == ref.dtype, name
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"grad {name}: {m}")


@needs_triton
def test_triton_only_some_grads_requested():
    x, w, b, p, patch = _make(CASES[0], seed=3)
    w = w.requires_grad_(True)
    out = patch_embed_triton(x, w, b, patch, p)  # x, b, p do not require grad
    (gw,) = torch.autograd.grad(out.square().sum(), [w])
    w_ref = w.detach().clone().requires_grad_(True)
    (gw_ref,) = torch.autograd.grad(patch_embed_torch(x, w_ref, b, patch, p).square().sum(), [w_ref])
    torch.testing.assert_close(gw, gw_ref, atol=1e-4, rtol=1e-4)


@needs_triton
def test_triton_finite_difference_float32():
    """Directional finite differences of <out, g> agree with the Triton gradients (x, w, b, pos)."""
    x, w, b, p, patch = _make(CASES[2], seed=4)
    g = torch.randn(1, p.shape[0], w.shape[0], generator=torch.Generator().manual_seed(5))
    _, grads = _grads(patch_embed_triton, x, w, b, p, patch, g)
    base = [x, w, b, p]
    eps = 1e-2
    for i, grad in enumerate(grads):
        v = torch.randn(base[i].shape, generator=torch.Generator().manual_seed(10 + i))
        plus = list(base)
        minus = list(base)
        plus[i] = base[i] + eps * v
        minus[i] = base[i] - eps * v
        f_plus = (patch_embed_triton(plus[0], plus[1], plus[2], patch, plus[3]) * g).sum()
        f_minus = (patch_embed_triton(minus[0], minus[1], minus[2], patch, minus[3]) * g).sum()
        fd = (f_plus - f_minus) / (2 * eps)
        analytic = (grad * v).sum()
        torch.testing.assert_close(fd, analytic, atol=2e-2, rtol=2e-3)


@needs_triton
def test_triton_non_contiguous_input():
    """Strided reads: a channels_last_3d volume and a sliced view give the same tokens and grads."""
    x, w, b, p, patch = _make(CASES[1], seed=6)
    ref = patch_embed_torch(x, w, b, patch, p)
    xc = x.contiguous(memory_format=torch.channels_last_3d).requires_grad_(True)
    out = patch_embed_triton(xc, w, b, patch, p)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    (gx,) = torch.autograd.grad(out.sum(), [xc])
    assert gx.stride() == xc.stride()
    xr = x.detach().clone().requires_grad_(True)
    (gx_ref,) = torch.autograd.grad(patch_embed_torch(xr, w, b, patch, p).sum(), [xr])
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4)
    big = torch.randn(x.shape[0], x.shape[1], 10, 12, 16)
    view = big[:, :, 1:9]
    torch.testing.assert_close(
        patch_embed_triton(view, w, b, patch), patch_embed_torch(view.contiguous(), w, b, patch), atol=1e-5, rtol=1e-5
    )


@needs_triton
def test_triton_float16_forward():
    x, w, b, p, patch = _make(CASES[0], seed=7)
    out = patch_embed_triton(x.half(), w.half(), b.half(), patch, p.half())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), patch_embed_torch(x, w, b, patch, p), atol=2e-2, rtol=2e-2)


def test_triton_requires_cuda_or_interpreter(monkeypatch):
    monkeypatch.setattr(pe, "_INTERPRET", False)
    x = torch.randn(1, 1, 4, 4, 4)
    w = torch.randn(4, 1, 2, 2, 2)
    with pytest.raises(RuntimeError, match="backend"):
        patch_embed_triton(x, w, None, 2)
    with pytest.raises(RuntimeError, match="backend"):
        PatchEmbed3d(1, 4, 2, backend="triton")(x)


# --------------------------------------------------------------------------- PatchEmbed3d


def test_module_matches_conv3d_state_dict_and_grid():
    conv = torch.nn.Conv3d(2, 24, kernel_size=(2, 4, 4), stride=(2, 4, 4))
    m = PatchEmbed3d(2, 24, (2, 4, 4), backend="torch")
    m.load_state_dict(conv.state_dict())
    x = torch.randn(2, 2, 8, 12, 16)
    assert m.grid_size(x.shape) == (4, 3, 4) and m.grid_size((8, 12, 16)) == (4, 3, 4)
    assert m.num_patches(x.shape) == 48
    torch.testing.assert_close(m(x), conv(x).flatten(2).transpose(1, 2), atol=1e-5, rtol=1e-5)
    # timm-style keys load as well; a state dict round trip keeps Conv3d shapes
    m2 = PatchEmbed3d(2, 24, (2, 4, 4))
    m2.load_state_dict({"proj.weight": conv.weight.detach(), "proj.bias": conv.bias.detach()})
    torch.testing.assert_close(m2.weight, conv.weight)
    assert m.state_dict()["weight"].shape == (24, 2, 2, 4, 4)
    with pytest.raises(ValueError, match="not divisible"):
        m.grid_size((8, 12, 15))
    with pytest.raises(ValueError, match="not divisible"):
        m(torch.randn(1, 2, 8, 12, 15))
    with pytest.raises(ValueError, match="backend"):
        PatchEmbed3d(1, 8, 4, backend="cudnn")


def test_module_auto_is_torch_on_cpu():
    m = PatchEmbed3d(1, 8, 4)
    assert m.resolved_backend(torch.randn(1, 1, 4, 4, 4)) == "torch"
    assert PatchEmbed3d(1, 8, 4, bias=False).bias is None


@needs_triton
@pytest.mark.parametrize("bias", [True, False])
def test_module_backends_agree(bias):
    torch.manual_seed(8)
    mt = PatchEmbed3d(2, 20, (4, 4, 2), bias=bias, backend="torch")
    mx = PatchEmbed3d(2, 20, (4, 4, 2), bias=bias, backend="triton")
    mx.load_state_dict(mt.state_dict())
    x = torch.randn(1, 2, 8, 4, 6)
    pos = torch.randn(mt.num_patches(x.shape), 20)
    outs, grads = [], []
    for m in (mt, mx):
        xi = x.clone().requires_grad_(True)
        out = m(xi, pos_embed=pos)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    for a, r in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- dtype policy and routing


@pytest.mark.parametrize("device_type, dtype, requested, prefer, triton_ok, expected", [
    ("cuda", torch.bfloat16, "auto", True, True, "triton"),
    ("cuda", torch.float16, "auto", True, True, "triton"),
    ("cuda", torch.float32, "auto", True, True, "torch"),  # never the fp32 kernels by default
    ("cuda", torch.bfloat16, "auto", False, True, "torch"),  # kernels not measured faster: torch
    ("cuda", torch.bfloat16, "auto", True, False, "torch"),  # no triton
    ("cpu", torch.bfloat16, "auto", True, True, "torch"),  # the interpreter is never chosen by itself
    ("cpu", torch.float32, "triton", False, False, "triton"),  # explicit choices are kept
    ("cuda", torch.bfloat16, "torch", True, True, "torch"),
])
def test_choose_backend_policy(device_type, dtype, requested, prefer, triton_ok, expected):
    assert pe.choose_backend(device_type, dtype, requested, triton_ok=triton_ok, prefer_triton=prefer) == expected


def test_choose_backend_defaults_and_errors(monkeypatch):
    monkeypatch.setattr(pe, "AUTO_PREFERS_TRITON", True)
    monkeypatch.setattr(pe, "HAS_TRITON", True)
    assert pe.choose_backend("cuda", torch.bfloat16) == "triton"
    monkeypatch.setattr(pe, "AUTO_PREFERS_TRITON", False)
    assert pe.choose_backend("cuda", torch.bfloat16) == "torch"
    with pytest.raises(ValueError, match="backend"):
        pe.choose_backend("cuda", torch.bfloat16, "cudnn")


def test_compute_dtype_follows_autocast():
    x = torch.randn(1, 1, 4, 4, 4)
    assert pe.compute_dtype(x) == torch.float32 and pe.compute_dtype(x.half()) == torch.float16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pe.compute_dtype(x) == torch.bfloat16
        assert pe.compute_dtype(x.double()) == torch.float64  # not autocast-eligible
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert pe.compute_dtype(x) == torch.float32


def test_module_auto_routing_uses_compute_dtype(monkeypatch):
    """auto -> torch on CPU whatever the flag; the module asks choose_backend with the autocast dtype."""
    m = PatchEmbed3d(1, 8, 4)
    x = torch.randn(1, 1, 4, 4, 4)
    seen = []
    real = pe.choose_backend

    def spy(device_type, dtype, requested="auto", **kw):
        seen.append((device_type, dtype, requested))
        return real(device_type, dtype, requested, **kw)

    monkeypatch.setattr("volfm.models.patch_embed.choose_backend", spy)
    monkeypatch.setattr(pe, "AUTO_PREFERS_TRITON", True)
    assert m.resolved_backend(x) == "torch"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m.resolved_backend(x) == "torch"
    assert seen == [("cpu", torch.float32, "auto"), ("cpu", torch.bfloat16, "auto")]
    assert PatchEmbed3d(1, 8, 4, backend="triton").resolved_backend(x) == "triton"


@needs_triton
def test_triton_autocast_fp16_interpreted():
    """Under autocast (fp16 on CPU: the interpreter's bf16 dot is wrong) fp32 inputs and parameters give an fp16
    output like the torch path under the same autocast, and fp32 gradients for the fp32 parameters and input."""
    x, w, b, p, patch = _make(CASES[0], seed=11)
    g = torch.randn(x.shape[0], p.shape[0], w.shape[0], generator=torch.Generator().manual_seed(12))
    res = {}
    for name, fn in (("torch", patch_embed_torch), ("triton", patch_embed_triton)):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b, p)]
        with torch.autocast("cpu", dtype=torch.float16):
            out = fn(leaves[0], leaves[1], leaves[2], patch, leaves[3])
        grads = torch.autograd.grad(out, leaves, g.to(out.dtype))
        res[name] = (out.detach(), grads)
    (out_t, grads_t), (out_x, grads_x) = res["torch"], res["triton"]
    assert out_x.dtype == out_t.dtype == torch.float16
    scale = out_t.float().abs().max()
    torch.testing.assert_close(out_x.float(), out_t.float(), atol=4e-3 * scale, rtol=0)
    for name, got, ref in zip(("x", "weight", "bias", "pos"), grads_x, grads_t):
        assert got.dtype == torch.float32 and ref.dtype == torch.float32, name
        torch.testing.assert_close(got, ref, atol=4e-3 * ref.abs().max(), rtol=0, msg=lambda m, n=name: f"{n}: {m}")


@needs_triton
def test_bias_grad_is_dy_sum_and_grad_out_may_be_strided():
    """grad bias = grad_out summed over batch and tokens (in fp32), also for a non-contiguous grad_out."""
    x, w, b, p, patch = _make(CASES[1], seed=13)
    B, N, E = x.shape[0], p.shape[0], w.shape[0]
    g = torch.randn(B, E, N, generator=torch.Generator().manual_seed(14)).transpose(1, 2)  # a strided view
    assert not g.is_contiguous()
    _, grads = _grads(patch_embed_triton, x, w, b, p, patch, g)
    _, ref = _grads(patch_embed_torch, x, w, b, p, patch, g.contiguous())
    torch.testing.assert_close(grads[2], g.reshape(-1, E).sum(0, dtype=torch.float32), atol=1e-6, rtol=1e-6)
    for got, r in zip(grads, ref):
        torch.testing.assert_close(got, r, atol=1e-4, rtol=1e-4)


@needs_triton
def test_split_k_weight_grad_deterministic(monkeypatch):
    """dW with the token reduction split over 3 programs: two runs bit-equal, and equal to one split up to
    float reassociation."""
    x, w, b, p, patch = _make(CASES[0], seed=15)  # M = 96 tokens: 3 splits of 32 under 16-token tiles
    g = torch.randn(x.shape[0], p.shape[0], w.shape[0], generator=torch.Generator().manual_seed(16))
    monkeypatch.setattr(pe, "_SPLIT_OVERRIDE", 3)
    runs = [_grads(patch_embed_triton, x, w, b, p, patch, g)[1][1] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    monkeypatch.setattr(pe, "_SPLIT_OVERRIDE", 1)
    one = _grads(patch_embed_triton, x, w, b, p, patch, g)[1][1]
    torch.testing.assert_close(runs[0], one, atol=1e-4, rtol=1e-4)
    _, ref = _grads(patch_embed_torch, x, w, b, p, patch, g)
    torch.testing.assert_close(runs[0], ref[1], atol=1e-4, rtol=1e-4)


@needs_triton
def test_weight_grad_in_parameter_dtype():
    """An fp32 input with bf16 parameters computes in fp32 (no autocast) and returns bf16 parameter grads."""
    x, w, b, p, patch = _make(CASES[0], seed=17)
    wb, bb = w.bfloat16().requires_grad_(True), b.bfloat16().requires_grad_(True)
    out = patch_embed_triton(x, wb, bb, patch, p)
    assert out.dtype == torch.float32
    gw, gb = torch.autograd.grad(out.sum(), [wb, bb])
    assert gw.dtype == torch.bfloat16 and gb.dtype == torch.bfloat16 and gw.shape == w.shape


def test_wave_model_and_helpers():
    """The host-side planning: split-K only where the weight-gradient tiles leave SMs idle and the token loop is
    long; forward tiles by waves; token-offset alignment."""
    half = True
    # ViT-B on 4 x 224x224x160 at patch 16 on 132 SMs: 6 x 32 tiles of 128 = 1.45 waves -> splitting pays
    s, _ = pe._dw_split((128, 128, 64, 8, 4), 7840, 768, 4096, 132, half)
    assert s > 1
    # 96^3 crops: M = 432 tokens is too short a loop to split
    assert pe._dw_split((128, 128, 64, 8, 4), 432, 768, 4096, 132, half)[0] == 1
    # a grid that fills the SMs twice over needs no split
    assert pe._dw_split((64, 64, 64, 4, 4), 7840, 768, 4096, 66, half)[0] == 1
    assert pe._row_align((4, 1, 224, 224, 160), (224 * 224 * 160, 224 * 224 * 160, 224 * 160, 160, 1), (16,) * 3) == 16
    assert pe._row_align((1, 3, 6, 10, 9), (540, 180, 90, 9, 1), (3, 5, 3)) == 1
    assert pe._m_bucket(7840) == 8192 and pe._m_bucket(8192) == 8192 and pe._m_bucket(1) == 16
    ranked = pe._rank_fwd([(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (64, 64, 64, 4, 4)], 7840, 768, 4096, 132)
    assert ranked[0] == (128, 128, 64, 8, 4)  # 2.8 waves beat 1.4 waves of the bigger tile
    small = pe._rank_fwd([(128, 128, 64, 8, 4), (64, 64, 64, 4, 4)], 432, 768, 4096, 132)
    assert small[0] == (64, 64, 64, 4, 4)


def test_select_times_the_top_candidates_and_caches(monkeypatch):
    """The tile choice on a GPU, with the timer and the CUDA calls faked: the fastest of the first _TUNE_TOP
    ranked candidates wins, a candidate that fails to compile is skipped, the choice is cached per key; small
    GEMMs, autotune off and CUDA-graph capture take the first ranked candidate that launches, untimed."""
    dev = torch.device("cuda", 0)
    speed = {"a": 3.0, "b": 1.0, "c": 2.0, "d": 0.5}  # "d" is fastest but ranked 4th: never timed
    launched = []

    def launch(c):
        launched.append(c)
        if c == "bad":
            raise RuntimeError("out of resources")

    monkeypatch.setattr(pe, "_TUNED", {})
    monkeypatch.setattr(pe, "_timed_ms", lambda fn, device: (fn(), speed[launched[-1]])[1])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    big = 2 * pe._TUNE_MIN_FLOPS
    assert pe._select("k1", lambda: ["a", "bad", "b", "c", "d"], launch, dev, big) == "b"
    assert "d" not in launched and "c" not in launched  # top 3 = a, bad, b
    launched.clear()
    assert pe._select("k1", lambda: 1 / 0, launch, dev, big) == "b" and launched == []  # cached: no ranking, no launch
    assert pe._select("k2", lambda: ["bad", "c", "a"], launch, dev, 1.0) == "c"  # small: first that launches
    monkeypatch.setenv("VOLFM_PATCH_EMBED_AUTOTUNE", "0")
    assert pe._select("k3", lambda: ["a", "b"], launch, dev, big) == "a"
    monkeypatch.delenv("VOLFM_PATCH_EMBED_AUTOTUNE")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    launched.clear()
    assert pe._select("k4", lambda: ["c", "a"], launch, dev, big) == "c" and launched == [] and "k4" not in pe._TUNED
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    with pytest.raises(RuntimeError, match="out of resources"):
        pe._select("k5", lambda: ["bad", "bad"], launch, dev, big)


@needs_triton
@pytest.mark.parametrize("splits", [1, 2])
def test_triton_even_tiles_take_the_unmasked_paths(monkeypatch, splits):
    """M, E and K all multiples of the interpreter's 16-wide tiles: every kernel runs without masks (EVEN_*), the
    weight gradient also with 2 splits of 32 tokens."""
    case = (1, 1, (8, 8, 16), (2, 2, 4), 32)  # grid 4x4x4: M = 64, K = 16, E = 32
    x, w, b, p, patch = _make(case, seed=18)
    g = torch.randn(1, p.shape[0], w.shape[0], generator=torch.Generator().manual_seed(19))
    monkeypatch.setattr(pe, "_SPLIT_OVERRIDE", splits)
    out, grads = _grads(patch_embed_triton, x, w, b, p, patch, g)
    ref_out, ref_grads = _grads(patch_embed_torch, x, w, b, p, patch, g)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for got, ref in zip(grads, ref_grads):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)

"""The Triton patch-embedding kernels compiled for a real GPU: bf16/fp16 numerics, the Hopper tile configs, split-K,
strided inputs and gradients, autocast in a ViT, CUDA-graph capture.

Skipped without CUDA. tests/conftest.py turns the Triton interpreter on (setdefault), which cannot run these (the
interpreter gets bf16 dots wrong and is not the GPU code), so on a GPU machine run

    TRITON_INTERPRET=0 python -m pytest tests/kernels/test_patch_embed_cuda.py

Tile configs are the wave model's first choice here (VOLFM_PATCH_EMBED_AUTOTUNE=0, fewer compiles), except in the
split-K test, which also runs the timed choice. Tolerances are relative to max |reference|: 2 eps of bf16/fp16
against the same-dtype reshape + F.linear path (same input rounding), 4 eps against an fp32 reference (inputs
rounded to bf16 first).
"""
import pytest
import torch

import volfm.kernels.patch_embed as pe
from volfm.kernels.patch_embed import patch_embed_torch, patch_embed_triton

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
if pe.triton_interpret_enabled():
    pytest.skip("TRITON_INTERPRET=1 is set (tests/conftest.py sets it unless the environment says otherwise): "
                "run with TRITON_INTERPRET=0 to test the compiled kernels", allow_module_level=True)
if not pe.HAS_TRITON:
    pytest.fail("CUDA is available but volfm.kernels could not import triton")

DEV = torch.device("cuda")
EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
# (B, C, I, J, K), patch, E. Every shape takes the same kernel code: the patch offsets col(k) are recomputed at each K
# step from the constexpr patch sizes (there is no separate pointer-increment path). Ragged: M = B*N, K = C*pd*ph*pw
# and E multiples of none of the tile sizes (the masked edges); with the patch 5x5x7 those per-step divisions are by
# 5, 5 and 7 and the volume rows are runs of 7 elements. The power-of-two patches (16^3, 16x16x8) divide by shifts and
# masks and read runs of 16 / 8 contiguous elements (16-byte loads in bf16/fp16).
SHAPES = {
    "ragged-5x5x7": ((5, 3, 30, 20, 21), (5, 5, 7), 300),  # M = 360, K = 525, E = 300
    "ragged-16": ((3, 1, 48, 32, 80), (16, 16, 16), 200),  # M = 90, K = 4096, E = 200
    "anisotropic": ((2, 1, 64, 64, 48), (16, 16, 8), 192),  # M = 192, K = 2048
    "crop96": ((2, 1, 96, 96, 96), (16, 16, 16), 768),  # M = 432 (small-M tiles)
    "merlin-2": ((2, 1, 224, 224, 160), (16, 16, 16), 768),  # M = 3920 (large tiles, split-K)
}


@pytest.fixture(autouse=True)
def _untimed_tile_choice(monkeypatch):
    """Correctness tests take the wave model's first tile config (one compile per kernel, not three: device time
    is scarce); test_split_k_weight_grad_bit_equal turns the timing back on."""
    monkeypatch.setenv("VOLFM_PATCH_EMBED_AUTOTUNE", "0")


def _rel(a, ref) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def _inputs(shape, patch, E, dtype, seed=0, memory_format=torch.contiguous_format):
    g = torch.Generator().manual_seed(seed)
    B, C = shape[:2]
    N = (shape[2] // patch[0]) * (shape[3] // patch[1]) * (shape[4] // patch[2])
    K = C * patch[0] * patch[1] * patch[2]
    x = torch.randn(shape, generator=g).to(DEV, dtype).contiguous(memory_format=memory_format)
    w = (torch.randn((E, C, *patch), generator=g) / K ** 0.5).to(DEV, dtype)
    b = (0.1 * torch.randn(E, generator=g)).to(DEV, dtype)
    p = (0.1 * torch.randn(N, E, generator=g)).to(DEV, dtype)
    gout = torch.randn((B, N, E), generator=g).to(DEV, dtype)
    return x, w, b, p, gout


def _run(fn, x, w, b, p, gout, patch):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b, p)]  # clone keeps the memory format
    out = fn(leaves[0], leaves[1], leaves[2], patch, leaves[3])
    grads = torch.autograd.grad(out, leaves, gout)
    return out.detach(), grads


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_half_forward_backward_vs_linear_and_fp32(name, dtype):
    shape, patch, E = SHAPES[name]
    x, w, b, p, gout = _inputs(shape, patch, E, dtype)
    out, grads = _run(patch_embed_triton, x, w, b, p, gout, patch)
    ref, ref_grads = _run(patch_embed_torch, x, w, b, p, gout, patch)
    ref32, ref32_grads = _run(patch_embed_torch, x.float(), w.float(), b.float(), p.float(), gout.float(), patch)
    eps = EPS[dtype]
    assert out.dtype == dtype and out.shape == ref.shape
    assert _rel(out, ref) <= 2 * eps and _rel(out, ref32) <= 2 * eps, (_rel(out, ref), _rel(out, ref32))
    for gname, got, r, r32 in zip(("dx", "dW", "db", "dpos"), grads, ref_grads, ref32_grads):
        assert got.dtype == dtype and got.shape == r.shape, gname
        assert _rel(got, r) <= 2 * eps, (gname, _rel(got, r))
        assert _rel(got, r32) <= 4 * eps, (gname, _rel(got, r32))


def test_channels_last_input_and_strided_grad_out():
    shape, patch, E = ((2, 3, 32, 48, 64), (16, 16, 16), 96)  # C = 3: the W stride is 3, not 1
    x, w, b, p, gout = _inputs(shape, patch, E, torch.bfloat16, seed=1, memory_format=torch.channels_last_3d)
    assert x.stride(4) == 3
    g_strided = gout.transpose(1, 2).contiguous().transpose(1, 2)  # same values, E-major storage
    assert not g_strided.is_contiguous()
    out, grads = _run(patch_embed_triton, x, w, b, p, g_strided, patch)
    ref, ref_grads = _run(patch_embed_torch, x.contiguous(), w, b, p, gout, patch)
    assert _rel(out, ref) <= 2 * EPS[torch.bfloat16]
    assert grads[0].stride() == x.stride()  # dx keeps the input's memory format
    for got, r in zip(grads, ref_grads):
        assert _rel(got, r) <= 2 * EPS[torch.bfloat16]


def test_fp32_exact_path():
    """fp32 with TF32 off: the kernels' fp32 ("ieee") path, as exact as the reference."""
    shape, patch, E = SHAPES["ragged-16"]
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        x, w, b, p, gout = _inputs(shape, patch, E, torch.float32, seed=2)
        out, grads = _run(patch_embed_triton, x, w, b, p, gout, patch)
        ref, ref_grads = _run(patch_embed_torch, x, w, b, p, gout, patch)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert _rel(out, ref) <= 1e-5
    for got, r in zip(grads, ref_grads):
        assert _rel(got, r) <= 1e-5


def test_split_k_weight_grad_bit_equal(monkeypatch):
    monkeypatch.delenv("VOLFM_PATCH_EMBED_AUTOTUNE")  # this test also covers the timed tile choice
    monkeypatch.setattr(pe, "_TUNED", {})
    monkeypatch.setattr(pe, "_PLANS", {})
    shape, patch, E = SHAPES["merlin-2"]
    x, w, b, p, gout = _inputs(shape, patch, E, torch.bfloat16, seed=3)
    w, b, p = w.float(), b.float(), p.float()  # fp32 master parameters: dW comes back in fp32 (no bf16 rounding)
    monkeypatch.setattr(pe, "_SPLIT_OVERRIDE", 3)
    a = _run(patch_embed_triton, x, w, b, p, gout, patch)[1][1]
    c = _run(patch_embed_triton, x, w, b, p, gout, patch)[1][1]
    assert torch.equal(a, c)
    monkeypatch.setattr(pe, "_SPLIT_OVERRIDE", None)
    d = _run(patch_embed_triton, x, w, b, p, gout, patch)[1][1]  # the tuned plan, twice: bit-equal too
    e = _run(patch_embed_triton, x, w, b, p, gout, patch)[1][1]
    assert torch.equal(d, e)
    assert _rel(a, d) <= 1e-5  # fp32 accumulation in both: only the summation order differs


def test_autocast_bf16_vit_triton_matches_torch():
    """A tiny registry ViT in fp32 under autocast(bf16), as `precision: bf16-mixed` trains it: the Triton patch
    embedding gives a bf16 token stream and fp32 parameter grads, close to the torch backend's."""
    from volfm.models import create_encoder

    torch.manual_seed(0)
    kw = dict(img_size=(64, 64, 32), depth=2)
    m_torch = create_encoder("vit_tiny_3d", patch_backend="torch", **kw).to(DEV)
    m_triton = create_encoder("vit_tiny_3d", patch_backend="triton", **kw).to(DEV)
    m_triton.load_state_dict(m_torch.state_dict())
    x = torch.randn(2, 1, 64, 64, 32, device=DEV)
    outs, grads = [], []
    for m in (m_torch, m_triton):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            tokens = m.patch_embed(x)
            assert tokens.dtype == torch.bfloat16
            y = m(x)
        y.float().square().mean().backward()
        outs.append(y.detach().float())
        grads.append({n: q.grad for n, q in m.named_parameters() if n.startswith("patch_embed")})
    # a wiring check (dtypes, routing, gradients reach the fp32 parameters), not a numerics test: two bf16 networks
    # that differ in one rounding of the tokens
    assert _rel(outs[1], outs[0]) <= 8 * EPS[torch.bfloat16]
    for n, g in grads[1].items():
        assert g.dtype == torch.float32, n
        assert _rel(g, grads[0][n]) <= 8 * EPS[torch.bfloat16], n


def test_cuda_graph_capture_replays():
    """After one eager call (tuning, token tables), forward + backward can be captured and replayed."""
    shape, patch, E = SHAPES["crop96"]
    x, w, b, p, gout = _inputs(shape, patch, E, torch.bfloat16, seed=4)
    wg, bg = w.clone().requires_grad_(True), b.clone().requires_grad_(True)

    def step():
        out = patch_embed_triton(x, wg, bg, patch, p)
        return torch.autograd.grad(out, [wg, bg], gout)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        eager = step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, c in zip(eager, captured):
        assert torch.equal(a, c)

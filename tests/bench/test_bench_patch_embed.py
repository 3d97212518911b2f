"""`volfm bench patch-embed` on CPU: a tiny run with triton under the interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), the FLOP formula, the --shapes parser, the peak table; the real run needs CUDA."""
import contextlib
import importlib.util
import io
import json

import pytest
import torch

import volfm.kernels.patch_embed as pe
from volfm.bench import patch_embed as bpe

# B=2, C=1, volume 16x16x8, patch 8x8x4 -> grid 2x2x2 = 8 tokens per volume, Kp = 256, E = 16
TINY = "2x1x16x16x8:8x8x4:16"
TINY_FWD_FLOPS = 2 * (2 * 8) * 256 * 16  # 2 * M * Kp * E = 131072


def _triton_skip_reason() -> str | None:
    """Named conditions only (never a kernel run): a kernel that raises or is off must fail the tiny run."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not pe.triton_interpret_enabled():
        return "TRITON_INTERPRET=1 is not set (tests/conftest.py sets it)"
    return None


TRITON_SKIP = _triton_skip_reason()
needs_interpreter = pytest.mark.skipif(TRITON_SKIP is not None, reason=f"triton cannot run here: {TRITON_SKIP}")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _run(argv):
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = bpe.main(argv)
    return rc, buf.getvalue()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    if TRITON_SKIP is not None:
        pytest.skip(f"triton cannot run here: {TRITON_SKIP}")
    out_json = tmp_path_factory.mktemp("bench_pe") / "results.json"
    rc, text = _run(["--shapes", TINY, "--device", "cpu", "--include-interpreted", "--repeats", "1",
                     "--warmup", "1", "--json", str(out_json)])
    return rc, text, json.loads(out_json.read_text()), out_json


@needs_interpreter
def test_tiny_run_prints_tables_and_skipped_goals(tiny_run):
    rc, text, _, out_json = tiny_run
    assert rc == 0
    assert "shape (B,C,I,J,K)" in text and "median ms" in text and "TFLOP/s" in text and "time/triton" in text
    assert "say nothing about the GPU goals" in text
    assert "fwd+bwd = forward + grads wrt weight, bias and input" in text
    assert "host ms" in text
    rows = [ln.split() for ln in text.splitlines() if ln.startswith("2x1x16x16x8 ")]
    speed = [r for r in rows if r[5] in ("fwd", "fwd+bwd")]
    assert sorted((r[5], r[-6]) for r in speed) == sorted(
        (mode, m) for mode in ("fwd", "fwd+bwd") for m in ("triton", "linear", "cudnn"))
    for r in speed:  # E, tokens per volume, Kp columns
        assert r[1:5] == ["8x8x4", "16", "8", "256"]
        # ms, host ms (CPU: n/a, the time is the host's), TFLOP/s, % peak (CPU: n/a)
        assert float(r[-5]) > 0 and r[-4] == "n/a" and float(r[-3]) > 0 and r[-2] == "n/a"
        if r[-6] == "triton":
            assert r[-1] == "1.00"
    assert sum(ln.startswith("2x1x16x16x8 ") and "fwd+bwd dW,db,dx" in ln for ln in text.splitlines()) == 3
    # each row was also printed (indented) as soon as it was measured: triton and linear on every mode first, then
    # cuDNN after them; the same figures as in the final table
    live_lines = [ln.split() for ln in text.splitlines() if ln.startswith("  2x1x16x16x8 ")]
    assert all(r[-3] == "(warm-up" and float(r[-2]) >= 0 and r[-1] == "s)" for r in live_lines)
    live = [r[:-3] for r in live_lines]
    assert [(r[5], r[-6]) for r in live] == [("fwd", "triton"), ("fwd", "linear"), ("fwd+bwd", "triton"),
                                             ("fwd+bwd", "linear"), ("fwd", "cudnn"), ("fwd+bwd", "cudnn")]
    assert sorted(live) == sorted(speed)
    assert "cudnn.benchmark: on for fwd, off for fwd+bwd (cuDNN's heuristic algorithms)" in text
    goal_lines = [ln for ln in text.splitlines() if ln.startswith("goal: ")]
    assert len(goal_lines) == 3 and all(ln.endswith(": skipped (no GPU)") for ln in goal_lines)
    assert any("1.3x the F.linear path" in ln for ln in goal_lines)
    assert any("faster than cuDNN" in ln for ln in goal_lines)
    assert any("60% of the dense bf16 peak (fwd, every shape with >= 8192 tokens)" in ln for ln in goal_lines)
    assert "check: triton and cudnn match the linear path" in text and "x max |ref|: PASS" in text
    assert f"results: {out_json}" in text


@needs_interpreter
def test_tiny_run_json_values(tiny_run):
    _, _, doc, _ = tiny_run
    assert doc["device"] == "cpu" and doc["dtype"] == "fp32" and doc["tolerance"] == 1e-4
    assert doc["methods_run"] == ["triton", "linear", "cudnn"] and doc["failed"] == {}
    assert doc["peak_tflops"] is None and doc["autocast"] is False and doc["input_dtype"] == "fp32"
    assert doc["cudnn_benchmark"] == "fwd" and doc["cuda_graphs"] is False and doc["elapsed_s"] > 0
    assert doc["complete"] is True and doc["in_progress"] is None and doc["methods"] == ["triton", "linear", "cudnn"]
    assert [e["mode"] for e in doc["results"]] == ["fwd", "fwd+bwd"]
    for e in doc["results"]:
        assert e["shape"] == [2, 1, 16, 16, 8] and e["patch"] == [8, 8, 4] and e["embed_dim"] == 16
        assert e["tokens"] == 8 and e["k"] == 256
        assert e["flops"] == TINY_FWD_FLOPS * (1 if e["mode"] == "fwd" else 3)
        ms = {m: r["median_ms"] for m, r in e["methods"].items()}
        assert set(ms) == {"triton", "linear", "cudnn"} and all(v > 0 for v in ms.values())
        assert e["m_tokens"] == 16
        for r in e["methods"].values():
            assert len(r["times_ms"]) == 1 and r["inner"] >= 1 and r["pct_peak"] is None
            assert r["tflops"] == pytest.approx(e["flops"] / (r["median_ms"] * 1e-3) / 1e12)
            assert r["timing"] == "perf_counter" and r["host_ms"] is None and r["eager_ms"] == r["median_ms"]
            assert r["warmup_s"] > 0  # one warm-up call (--warmup 1)
        assert e["methods"]["cudnn"]["cudnn_benchmark"] is (e["mode"] == "fwd")  # the default --cudnn-benchmark fwd
        assert e["linear_over_triton"] == pytest.approx(ms["linear"] / ms["triton"])
        assert e["cudnn_over_triton"] == pytest.approx(ms["cudnn"] / ms["triton"])
    checks = {c["method"]: c for c in doc["correctness"] if not c["ragged"]}
    assert set(checks) == {"triton", "linear", "cudnn"}
    assert all(c["shape"] == [2, 1, 16, 16, 8] for c in checks.values())
    for m in ("triton", "cudnn"):
        c = checks[m]
        for key in ("out_vs_linear", "out_vs_fp32", "dW_vs_linear", "db_vs_linear", "dx_vs_linear"):
            assert 0 <= c[key] <= 1e-4, (m, key, c[key])
        assert c["ok"] is True
    assert checks["linear"]["out_vs_linear"] == 0.0
    assert all(doc["goals"][k]["pass"] is None for k in ("vs_linear", "vs_cudnn", "peak"))
    assert doc["goals"]["match"]["pass"] is True and doc["goals"]["match"]["worst_rel_diff"] <= 1e-4


@needs_interpreter
def test_tiny_run_also_checks_a_ragged_shape(tiny_run):
    """The correctness check (not the timing) also runs on a shape whose M, E and Kp are multiples of none of the
    kernels' block sizes and span at least two blocks: the masked tile edges of the forward and both backward kernels."""
    _, text, doc, _ = tiny_run
    for dev, blocks in (("cpu", (16,)), ("cuda", (32, 64, 128, 256))):  # the interpreter's and the GPU's blocks
        c = bpe.parse_shape(bpe.RAGGED_CHECK_SHAPES[dev])
        for n in (c.shape[0] * c.tokens, c.embed_dim, c.k):  # M, E, Kp: ragged, and at least two blocks
            assert all(n % blk for blk in blocks) and n > max(blocks), (dev, n)
    case = bpe.parse_shape(bpe.RAGGED_CHECK_SHAPES["cpu"])
    ragged = [c for c in doc["correctness"] if c["ragged"]]
    assert sorted(c["method"] for c in ragged) == ["cudnn", "linear", "triton"]
    for c in ragged:
        assert (c["shape"], c["patch"], c["embed_dim"]) == (list(case.shape), list(case.patch), case.embed_dim)
        for key in ("out_vs_linear", "out_vs_fp32", "dW_vs_linear", "db_vs_linear", "dx_vs_linear"):
            assert 0 <= c[key] <= 1e-4, (c["method"], key, c[key])
        assert c["ok"] is True
    assert sum(ln.endswith("(ragged, check only)") for ln in text.splitlines()) == 3
    assert all(e["shape"] != list(case.shape) for e in doc["results"])  # checked, never timed


def test_without_triton_no_input_grad_and_peak_override(tmp_path):
    out_json = tmp_path / "r.json"
    rc, text = _run(["--shapes", TINY, "--device", "cpu", "--mode", "fwd+bwd", "--no-input-grad", "--repeats",
                     "2", "--warmup", "0", "--inner", "2", "--peak-tflops", "0.001", "--json", str(out_json)])
    doc = json.loads(out_json.read_text())
    assert rc == 0
    assert doc["methods_run"] == ["linear", "cudnn"]  # no --include-interpreted: triton is not run on CPU
    assert "triton not run" in text and "--include-interpreted" in text
    assert "grads wrt weight and bias (--no-input-grad)" in text and "fwd+bwd dW,db " in text
    (e,) = doc["results"]
    assert e["mode"] == "fwd+bwd" and e["input_grad"] is False
    assert e["flops"] == 2 * TINY_FWD_FLOPS
    assert e["linear_over_triton"] is None and e["cudnn_over_triton"] is None
    for r in e["methods"].values():
        assert r["inner"] == 2 and len(r["times_ms"]) == 2
        assert r["pct_peak"] == pytest.approx(100 * r["tflops"] / 0.001)
    cud = next(c for c in doc["correctness"] if c["method"] == "cudnn")
    assert "dx_vs_linear" not in cud and cud["dW_vs_linear"] <= 1e-4 and cud["ok"] is True
    assert sorted((c["method"], c["ragged"]) for c in doc["correctness"]) == [
        ("cudnn", False), ("cudnn", True), ("linear", False), ("linear", True)]
    assert doc["peak_source"] == "--peak-tflops"
    assert all(ln.endswith("skipped (no GPU)") for ln in text.splitlines() if ln.startswith("goal: "))


@needs_interpreter
def test_autocast_run_fp32_inputs_fp16_compute(tmp_path):
    """--autocast: fp32 inputs and parameters, every method under autocast (fp16 on CPU: the interpreter's bf16
    dot is wrong); the tolerance is the compute dtype's, and the weight/bias gradients match the linear path's."""
    out_json = tmp_path / "ac.json"
    rc, text = _run(["--shapes", TINY, "--device", "cpu", "--include-interpreted", "--autocast", "--repeats", "1",
                     "--warmup", "1", "--inner", "1", "--mode", "fwd+bwd", "--no-input-grad", "--json", str(out_json)])
    doc = json.loads(out_json.read_text())
    assert rc == 0, text
    assert doc["autocast"] is True and doc["dtype"] == "fp16" and doc["input_dtype"] == "fp32"
    assert doc["tolerance"] == pytest.approx(2 * 2 ** -10)
    assert "fp32 inputs and parameters under torch.autocast(cpu, fp16)" in text
    assert "methods and the linear path under autocast" in text
    tri = next(c for c in doc["correctness"] if c["method"] == "triton" and not c["ragged"])
    assert tri["ok"] is True and "dx_vs_linear" not in tri
    assert bpe.main(["--autocast", "--dtype", "fp32", "--device", "cpu"]) == 2


def test_method_budget_caps_repeats(tmp_path):
    """A method slower than --method-budget-s allows gets fewer repeats (at least 3), the others keep theirs."""
    out_json = tmp_path / "b.json"
    rc, _ = _run(["--shapes", TINY, "--device", "cpu", "--mode", "fwd", "--repeats", "5", "--warmup", "0",
                  "--inner", "1", "--method-budget-s", "1e-9", "--json", str(out_json)])
    doc = json.loads(out_json.read_text())
    assert rc == 0
    assert all(len(r["times_ms"]) == 3 for r in doc["results"][0]["methods"].values())
    assert bpe.main(["--method-budget-s", "0", "--device", "cpu"]) == 2


def _recording_fns(monkeypatch, calls: list, fail_on=None):
    """Wrap the bench's methods so each call appends (method, grad enabled, cudnn.benchmark, volume shape) to
    ``calls``; ``fail_on``: a method whose first call raises KeyboardInterrupt (what a kill looks like to Python)."""
    orig = bpe._method_fns

    def fns(torch_, F_, pe_):
        real = orig(torch_, F_, pe_)

        def wrap(m):
            def call(x, w, b, patch):
                calls.append((m, torch.is_grad_enabled(), torch.backends.cudnn.benchmark, tuple(x.shape)))
                if m == fail_on:
                    raise KeyboardInterrupt
                return real[m](x, w, b, patch)
            return call
        return {m: wrap(m) for m in real}

    monkeypatch.setattr(bpe, "_method_fns", fns)


@pytest.mark.parametrize("setting, fwd_on, bwd_on", [("fwd", True, False), ("on", True, True), ("off", False, False)])
def test_cudnn_benchmark_setting_per_mode(monkeypatch, tmp_path, setting, fwd_on, bwd_on):
    """--cudnn-benchmark: cuDNN's forward-only calls (timed, and the check's forward) run with the flag as set for fwd,
    its fwd+bwd calls as set for fwd+bwd; the flag is restored after the run and recorded in the JSON and rows."""
    calls = []
    _recording_fns(monkeypatch, calls)
    before = torch.backends.cudnn.benchmark
    argv = ["--shapes", TINY, "--device", "cpu", "--repeats", "1", "--warmup", "1", "--inner", "1",
            "--json", str(tmp_path / "r.json")] + ([] if setting == "fwd" else ["--cudnn-benchmark", setting])
    rc, text = _run(argv)
    assert rc == 0 and torch.backends.cudnn.benchmark == before
    cud = [(grad, flag) for m, grad, flag, _ in calls if m == "cudnn"]
    assert {flag for grad, flag in cud if not grad} == {fwd_on}  # timed fwd calls and the check's forward
    assert {flag for grad, flag in cud if grad} == {bwd_on}  # timed fwd+bwd calls and the check's gradients
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["cudnn_benchmark"] == setting
    assert {e["mode"]: e["methods"]["cudnn"]["cudnn_benchmark"] for e in doc["results"]} == \
        {"fwd": fwd_on, "fwd+bwd": bwd_on}
    assert f"cudnn.benchmark: {'on' if setting == 'on' else 'off' if setting == 'off' else 'on for fwd'}" in text
    with pytest.raises(SystemExit):
        bpe.build_parser().parse_args(["--cudnn-benchmark", "sometimes"])


def test_methods_option(tmp_path):
    """--methods picks the methods; the linear path stays the correctness reference even when it is not timed."""
    out_json = tmp_path / "m.json"
    rc, text = _run(["--shapes", TINY, "--device", "cpu", "--methods", "cudnn", "--repeats", "1", "--warmup", "0",
                     "--inner", "1", "--json", str(out_json)])
    doc = json.loads(out_json.read_text())
    assert rc == 0 and doc["methods"] == doc["methods_run"] == ["cudnn"]
    assert all(set(e["methods"]) == {"cudnn"} and e["cudnn_over_triton"] is None for e in doc["results"])
    assert sorted((c["method"], c["ragged"]) for c in doc["correctness"]) == [("cudnn", False), ("cudnn", True)]
    assert all(c["ok"] and 0 < c["out_vs_linear"] <= 1e-4 for c in doc["correctness"])
    assert "triton not run" not in text  # not asked for: no note
    rc, doc = bpe.run(["--shapes", TINY, "--device", "cpu", "--methods", " cudnn , LINEAR", "--mode", "fwd",
                       "--repeats", "1", "--warmup", "0", "--inner", "1"])
    assert rc == 0 and doc["methods_run"] == ["linear", "cudnn"]  # METHODS order, whatever the order given


@pytest.mark.parametrize("bad", ["", "linear,conv", "cuda"])
def test_bad_methods_exit_2_one_line(bad, capsys):
    assert bpe.main(["--methods", bad, "--device", "cpu", "--shapes", TINY]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert captured.out == "" and "\n" not in err and err.startswith("volfm bench patch-embed: --methods ")


def test_killed_during_cudnn_leaves_the_rows_measured_before(monkeypatch, tmp_path):
    """A run stopped in cuDNN's first call (here a KeyboardInterrupt, as a kill would) has already printed and
    written every linear row (and triton's, were it run): the JSON says what it was doing, and is not complete."""
    calls = []
    _recording_fns(monkeypatch, calls, fail_on="cudnn")
    out_json = tmp_path / "k.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(KeyboardInterrupt):
        bpe.main(["--shapes", TINY, "2x1x16x16x16:8:16", "--device", "cpu", "--repeats", "1", "--warmup", "0",
                  "--inner", "1", "--json", str(out_json)])
    text = buf.getvalue()
    assert [m for m, *_ in calls][-1] == "cudnn" and [m for m, *_ in calls].count("cudnn") == 1
    doc = json.loads(out_json.read_text())
    assert doc["complete"] is False and doc["in_progress"] == "cudnn on 2x1x16x16x8 fwd"
    rows = {(tuple(e["shape"]), e["mode"]): set(e["methods"]) for e in doc["results"]}
    assert rows == {(s, m): {"linear"} for s in ((2, 1, 16, 16, 8), (2, 1, 16, 16, 16)) for m in ("fwd", "fwd+bwd")}
    assert sum(c["method"] == "linear" for c in doc["correctness"]) == 3  # both shapes and the ragged one
    assert sum(ln.startswith("  2x1x16x16") and " linear " in ln for ln in text.splitlines()) == 4
    assert not (tmp_path / "k.json.tmp").exists()


def test_cudnn_bwd_max_tokens(tmp_path):
    """--cudnn-bwd-max-tokens N: cuDNN's fwd+bwd is neither timed nor checked on shapes with more than N tokens."""
    out_json = tmp_path / "t.json"
    rc, text = _run(["--shapes", TINY, "--device", "cpu", "--cudnn-bwd-max-tokens", "8", "--repeats", "1",
                     "--warmup", "0", "--inner", "1", "--json", str(out_json)])
    doc = json.loads(out_json.read_text())
    assert rc == 0 and doc["cudnn_bwd_max_tokens"] == 8
    assert {e["mode"]: set(e["methods"]) for e in doc["results"]} == {"fwd": {"linear", "cudnn"},
                                                                      "fwd+bwd": {"linear"}}
    assert "cudnn fwd+bwd not timed on 2x1x16x16x8 (16 tokens > --cudnn-bwd-max-tokens 8)" in doc["notes"]
    cud = next(c for c in doc["correctness"] if c["method"] == "cudnn" and not c["ragged"])
    assert "dW_vs_linear" not in cud and cud["ok"] is True
    rag = next(c for c in doc["correctness"] if c["method"] == "cudnn" and c["ragged"])  # 24 tokens: also fwd only
    assert "dW_vs_linear" not in rag
    row = next(ln for ln in text.splitlines() if ln.startswith("2x1x16x16x8 ") and " cudnn " in ln
               and ln.endswith("yes"))  # the correctness table: no gradient columns for cuDNN here
    assert row.split()[-4:] == ["n/a", "n/a", "n/a", "yes"]
    assert bpe.main(["--cudnn-bwd-max-tokens", "0", "--device", "cpu"]) == 2


def test_run_returns_the_json_document(tmp_path):
    rc, doc = bpe.run(["--shapes", TINY, "--device", "cpu", "--mode", "fwd", "--repeats", "1", "--warmup", "0",
                       "--inner", "1"])
    assert rc == 0 and doc["results"][0]["shape"] == [2, 1, 16, 16, 8] and doc["methods_run"] == ["linear", "cudnn"]
    assert bpe.run(["--repeats", "0"]) == (2, None)


def test_flops_formula_by_hand():
    # 4 x 1 x 224x224x160, patch 16: grid 14*14*10 = 1960 tokens, M = 7840, Kp = 4096, E = 768
    assert bpe.patch_embed_flops((4, 1, 224, 224, 160), (16, 16, 16), 768) == 49_325_015_040
    assert bpe.patch_embed_flops((4, 1, 224, 224, 160), (16, 16, 16), 768, "fwd+bwd") == 147_975_045_120
    assert bpe.patch_embed_flops((4, 1, 224, 224, 160), (16, 16, 16), 768, "fwd+bwd", input_grad=False) \
        == 98_650_030_080
    # 4 channels: Kp = 16384
    assert bpe.patch_embed_flops((4, 4, 224, 224, 160), (16, 16, 16), 768) == 197_300_060_160
    # anisotropic 16x16x8 on 2 x 1 x 224x224x160: grid 14*14*20 = 3920, M = 7840, Kp = 2048
    case = bpe.parse_shape("2x1x224x224x160:16x16x8:768")
    assert (case.grid, case.tokens, case.k) == ((14, 14, 20), 3920, 2048)
    assert case.flops() == 2 * 7840 * 2048 * 768 == 24_662_507_520
    with pytest.raises(ValueError):
        bpe.patch_embed_flops((1, 1, 16, 16, 16), (16, 16, 16), 8, "bwd")


@pytest.mark.parametrize("text, shape, patch, emb", [
    ("4x1x224x224x160:16:768", (4, 1, 224, 224, 160), (16, 16, 16), 768),
    ("2,1,224,224,160:16,16,8:768", (2, 1, 224, 224, 160), (16, 16, 8), 768),
    (" 2x1x96x96x96 : 16x16x16 : 384 ", (2, 1, 96, 96, 96), (16, 16, 16), 384),
])
def test_parse_shape_good(text, shape, patch, emb):
    c = bpe.parse_shape(text)
    assert (c.shape, c.patch, c.embed_dim) == (shape, patch, emb)


@pytest.mark.parametrize("bad, words", [
    ("4x1x224x224:16:768", "needs 5 sizes"),
    ("4x1x225x224x160:16:768", "not divisible"),
    ("4x1x224x224x160:16", "expected BxCxIxJxK:P:E"),
    ("4x1x224x224x160:16x16:768", "patch needs 1 or 3"),
    ("4x1x224x224x160:16:abc", "not a list of integers"),
    ("0x1x224x224x160:16:768", "must be positive"),
    ("4x1x224x224x160:0:768", "must be positive"),
    ("4x1x224x224x160:16:768:1", "expected BxCxIxJxK:P:E"),
])
def test_bad_shapes_exit_2_one_line(bad, words, capsys):
    assert bpe.main(["--shapes", "2x1x16x16x16:16:8", bad, "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and captured.out == ""
    assert err.startswith("volfm bench patch-embed: --shapes ") and words in err and repr(bad) in err


def test_other_bad_arguments(capsys):
    assert bpe.main(["--repeats", "0"]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err
    assert bpe.main(["--peak-tflops", "0", "--device", "cpu"]) == 2
    assert bpe.main(["--device", "nonsense"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2
    with pytest.raises(SystemExit) as exc:
        bpe.main(["--dtype", "fp8"])
    assert exc.value.code == 2
    if not torch.cuda.is_available():
        assert bpe.main(["--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err


def test_peak_table():
    assert bpe.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert bpe.peak_bf16_tflops("NVIDIA H100 SXM5 80GB") == 989.4
    assert bpe.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert bpe.peak_bf16_tflops("NVIDIA H200") == 989.4
    assert bpe.peak_bf16_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert bpe.peak_bf16_tflops("NVIDIA A100 80GB PCIe") == 312.0
    assert bpe.peak_bf16_tflops("NVIDIA L40S") == 362.0
    assert bpe.peak_bf16_tflops("NVIDIA GeForce RTX 4090") == 165.0
    for unknown in ("NVIDIA L40", "NVIDIA H100 NVL", "NVIDIA H200 NVL", "Tesla T4", "cpu"):
        assert bpe.peak_bf16_tflops(unknown) is None, unknown


def test_tolerances():
    assert bpe.tolerance("fp32") == 1e-4
    assert bpe.tolerance("bf16") == pytest.approx(2 * 2 ** -7)
    assert bpe.tolerance("fp16") == pytest.approx(2 * 2 ** -10)


@needs_cuda
def test_cuda_run(tmp_path):  # pragma: no cover - needs a GPU
    out_json = tmp_path / "gpu.json"
    rc, text = _run(["--shapes", "2x1x64x64x32:16:96", "2x1x64x64x32:16x16x8:128", "--repeats", "3",
                     "--json", str(out_json)])
    doc = json.loads(out_json.read_text())
    assert doc["dtype"] == "bf16" and doc["device"].startswith("cuda")
    assert doc["methods_run"] == ["triton", "linear", "cudnn"] and doc["failed"] == {}
    assert rc == 0 and doc["goals"]["match"]["pass"] is True
    assert doc["complete"] is True and doc["cudnn_benchmark"] == "fwd"
    assert "timing cudnn on 2x1x64x64x32 fwd (cudnn.benchmark on)" in text
    assert "timing cudnn on 2x1x64x64x32 fwd+bwd (cudnn.benchmark off)" in text
    for c in doc["correctness"]:
        assert c["ok"] is True and c["out_vs_fp32"] <= doc["tolerance"]
    ragged = bpe.parse_shape(bpe.RAGGED_CHECK_SHAPES["cuda"])
    assert sorted(c["method"] for c in doc["correctness"] if c["ragged"]) == ["cudnn", "linear", "triton"]
    assert all(c["shape"] == list(ragged.shape) for c in doc["correctness"] if c["ragged"])
    for e in doc["results"]:
        assert e["linear_over_triton"] > 0 and e["cudnn_over_triton"] > 0
    goal_lines = [ln for ln in text.splitlines() if ln.startswith("goal: ")]
    assert len(goal_lines) == 3 and not any("no GPU" in ln for ln in goal_lines)
    assert all(("PASS" in ln) or ("FAIL" in ln) or ("skipped" in ln) for ln in goal_lines)


def _entry(shape, patch, mode, ms, flops):
    e = {"shape": list(shape), "patch": list(patch), "mode": mode, "flops": flops,
         "methods": {m: {"median_ms": t, "tflops": flops / (t * 1e-3) / 1e12} for m, t in ms.items()}}
    for m in ("linear", "cudnn"):
        e[f"{m}_over_triton"] = ms[m] / ms["triton"]
    return e


def test_goal_logic_on_cuda_results():
    """The GPU goal lines from synthetic CUDA results (the decision logic, without a GPU)."""
    from types import SimpleNamespace

    big = bpe.patch_embed_flops((8, 1, 224, 224, 160), (16, 16, 16), 768)  # 98.7 GFLOP, M = 15680 tokens
    small = bpe.patch_embed_flops((2, 1, 96, 96, 96), (16, 16, 16), 768)
    checks = [{"method": "triton", "out_vs_linear": 3e-3, "out_vs_fp32": 2e-3, "ok": True}]
    # big fwd: triton 0.16 ms -> 616.6 TFLOP/s = 62.3% of 989.4; linear 1.5x, cudnn 1.1x slower
    results = [_entry((8, 1, 224, 224, 160), (16, 16, 16), "fwd", {"triton": 0.16, "linear": 0.24, "cudnn": 0.176},
                      big),
               _entry((2, 1, 96, 96, 96), (16, 16, 16), "fwd", {"triton": 0.01, "linear": 0.0125, "cudnn": 0.02},
                      small)]
    args = SimpleNamespace(dtype="bf16")
    g = bpe._goals(args, True, results, ["triton", "linear", "cudnn"], {}, 989.4, checks, 0.0156)
    # the small shape is only 1.25x faster than linear: the every-shape goal fails there
    assert g["vs_linear"]["pass"] is False and g["vs_linear"]["worst_ratio"] == pytest.approx(1.25)
    assert g["vs_linear"]["worst_at"]["shape"] == [2, 1, 96, 96, 96] and "FAIL" in g["vs_linear"]["line"]
    assert g["vs_cudnn"]["pass"] is True and g["vs_cudnn"]["worst_ratio"] == pytest.approx(1.1)
    # the small shape (432 tokens, 3.6% of peak) is not judged for the peak goal: only M >= 8192 tokens
    assert g["peak"]["pass"] is True and g["peak"]["shape"] == [8, 1, 224, 224, 160] and g["peak"]["tokens"] == 15680
    assert g["peak"]["fraction"] == pytest.approx(big / 0.16e-3 / 1e12 / 989.4)
    assert "PASS (worst 62.3%" in g["peak"]["line"] and "15680 tokens" in g["peak"]["line"]
    assert g["match"]["pass"] is True
    # no shape with >= 8192 tokens (Merlin's batch of 4: M = 7840): the peak goal is skipped, saying so
    four = [_entry((4, 1, 224, 224, 160), (16, 16, 16), "fwd", {"triton": 0.08, "linear": 0.12, "cudnn": 0.088},
                   big // 2)]
    g4 = bpe._goals(args, True, four, ["triton", "linear", "cudnn"], {}, 989.4, checks, 0.0156)
    assert g4["peak"]["pass"] is None and "largest forward has 7840 tokens" in g4["peak"]["line"]
    # slower triton on the big shape: peak goal fails; cudnn faster than triton: fails
    results[0]["methods"]["triton"]["tflops"] = big / 0.2e-3 / 1e12  # 493 TFLOP/s = 49.9%
    results[0]["cudnn_over_triton"] = 0.9
    g = bpe._goals(args, True, results, ["triton", "linear", "cudnn"], {}, 989.4, checks, 0.0156)
    assert g["peak"]["pass"] is False and g["vs_cudnn"]["pass"] is False
    # unknown peak / other dtype / triton failure / bad numbers
    g = bpe._goals(args, True, results, ["triton", "linear", "cudnn"], {}, None, checks, 0.0156)
    assert g["peak"]["pass"] is None and "--peak-tflops" in g["peak"]["line"]
    g = bpe._goals(SimpleNamespace(dtype="fp16"), True, results, ["triton", "linear", "cudnn"], {}, 989.4, checks,
                   0.0156)
    assert g["peak"]["pass"] is None and "skipped (dtype fp16" in g["peak"]["line"]
    g = bpe._goals(args, True, results, ["triton", "linear", "cudnn"], {"triton": "boom"}, 989.4, checks, 0.0156)
    assert all(g[k]["pass"] is False and g[k]["line"].endswith("FAIL (triton failed)")
               for k in ("vs_linear", "vs_cudnn", "peak"))
    bad = [{"method": "triton", "out_vs_linear": 0.05, "out_vs_fp32": 2e-3, "ok": False}]
    g = bpe._goals(args, True, results, ["triton", "linear", "cudnn"], {}, 989.4, bad, 0.0156)
    assert g["match"]["pass"] is False and g["match"]["worst_rel_diff"] == 0.05 and "FAIL" in g["match"]["line"]


@needs_interpreter
def test_run_suite_dry_runs(tmp_path):
    """run_suite: several configurations in one process, a document per run (what `volfm bench gpu` merges)."""
    res = bpe.run_suite(bpe.DRY_RUNS, json_dir=tmp_path, quiet=True)
    assert res["returncode"] == 0 and set(res["runs"]) == set(bpe.DRY_RUNS) and res["elapsed_s"] > 0
    for name, doc in res["runs"].items():
        assert doc["methods_run"] == ["triton", "linear", "cudnn"] and doc["goals"]["match"]["pass"] is True, name
        assert json.loads((tmp_path / f"pe_{name}.json").read_text())["results"] == doc["results"]
        assert doc["complete"] is True and "pending" not in doc
        assert all(set(e["methods"]) == {"triton", "linear", "cudnn"} for e in doc["results"]), name
    assert res["runs"]["dry-autocast"]["autocast"] is True


def test_run_suite_times_cudnn_after_every_other_row(monkeypatch, tmp_path):
    """run_suite: every run's triton/linear part first; the cuDNN parts at the end, the run with fewer tokens first,
    merged into each run's document. When cuDNN starts, every file already holds its run's other rows."""
    calls, seen_at_first_cudnn = [], {}
    _recording_fns(monkeypatch, calls)
    real = bpe._method_fns

    def fns(*a):
        f = real(*a)
        cud = f["cudnn"]

        def cudnn(x, w, b, patch):
            if not seen_at_first_cudnn:
                for name in ("big", "small", "lin"):
                    seen_at_first_cudnn[name] = json.loads((tmp_path / f"pe_{name}.json").read_text())
            return cud(x, w, b, patch)
        return {**f, "cudnn": cudnn}

    monkeypatch.setattr(bpe, "_method_fns", fns)
    common = ["--device", "cpu", "--repeats", "1", "--warmup", "0", "--inner", "1"]
    runs = {"big": ["--shapes", "4x1x16x16x16:8:16", "--mode", "fwd"] + common,
            "small": ["--shapes", TINY, "--mode", "both"] + common,
            "lin": ["--shapes", TINY, "--mode", "fwd", "--methods", "linear"] + common}
    res = bpe.run_suite(runs, json_dir=tmp_path, quiet=True)
    assert res["returncode"] == 0 and list(res["runs"]) == ["big", "small", "lin"]
    # the cuDNN parts: "small" (16 tokens) before "big" (4 x 8 = 32 tokens)
    cud_shapes = list(dict.fromkeys(s for m, _, _, s in calls if m == "cudnn"))
    assert cud_shapes[0] == (2, 1, 16, 16, 8) and (4, 1, 16, 16, 16) in cud_shapes
    for name in ("big", "small"):
        before = seen_at_first_cudnn[name]
        assert before["complete"] is False
        if name == "big":  # waiting for its cuDNN part
            assert before["pending"] == ["cudnn"] and before["in_progress"] is None
            assert before["methods_run"] == ["linear"]
        else:  # in its cuDNN part: the file says so
            assert before["in_progress"] == "cudnn on 2x1x16x16x8 fwd"
        assert all(set(e["methods"]) == {"linear"} for e in before["results"]) and before["results"]
        doc = res["runs"][name]
        assert doc["complete"] is True and "pending" not in doc and doc["methods_run"] == ["linear", "cudnn"]
        assert all(set(e["methods"]) == {"linear", "cudnn"} for e in doc["results"])
        assert [e["mode"] for e in doc["results"]] == (["fwd"] if name == "big" else ["fwd", "fwd+bwd"])
        assert sorted((c["method"], c["ragged"]) for c in doc["correctness"]) == [
            ("cudnn", False), ("cudnn", True), ("linear", False), ("linear", True)]
        assert doc["elapsed_s"] > before["elapsed_s"]
        # the linear rows were measured before any cuDNN call and kept as they were (the linear path still runs
        # after it, as the reference of cuDNN's correctness check, untimed)
        assert [e["methods"]["linear"] for e in doc["results"]] == [e["methods"]["linear"] for e in before["results"]]
        assert json.loads((tmp_path / f"pe_{name}.json").read_text()) == json.loads(json.dumps(doc))
    lin = seen_at_first_cudnn["lin"]  # a run without cuDNN: complete before the first cuDNN call
    assert lin["complete"] is True and "pending" not in lin and res["runs"]["lin"]["methods_run"] == ["linear"]


def test_gpu_run_lists_parse():
    """The GPU run lists are valid command lines: every shape parses, the peak goal has a shape to judge."""
    for runs in (bpe.GPU_RUNS, bpe.GPU_RUNS_FP):
        for argv in runs.values():
            args = bpe.build_parser().parse_args(argv)
            for s in args.shapes:
                bpe.parse_shape(s)
    xl = bpe.parse_shape(bpe.SHAPE_XL)
    assert xl.shape[0] * xl.tokens >= bpe.GOAL_PEAK_MIN_TOKENS
    assert "--cuda-graphs" in bpe.GPU_RUNS["bf16-small"]
    # cudnn.benchmark stays at its default (forward only) everywhere; cuDNN's fwd+bwd (heuristic algorithms, ~0.3 s
    # per call on the 4x shape) on the 4x shape and the crop, not on 8x, not without dx, not under autocast
    large = bpe.parse_shape(bpe.SHAPE_LARGE)
    assert large.shape[0] * large.tokens <= bpe.CUDNN_BWD_MAX_TOKENS < xl.shape[0] * xl.tokens
    parsed = {n: bpe.build_parser().parse_args(a) for n, a in {**bpe.GPU_RUNS, **bpe.GPU_RUNS_FP}.items()}
    assert all(a.cudnn_benchmark == "fwd" for a in parsed.values())
    assert "cudnn" in bpe._parse_methods(parsed["bf16"].methods) and parsed["bf16"].cudnn_bwd_max_tokens == 8192
    for name in ("bf16-no-dx", "autocast"):
        assert bpe._parse_methods(parsed[name].methods) == ["triton", "linear"]
    assert set(parsed["bf16"].shapes) == {bpe.SHAPE_XL, bpe.SHAPE_LARGE} and parsed["bf16"].mode == "both"
    assert parsed["bf16-no-dx"].shapes == [bpe.SHAPE_LARGE] and parsed["autocast"].shapes == [bpe.SHAPE_LARGE]
